"""sdi-attribute: config composition, the local and SLURM launchers, bad configs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import cli_overrides, token_overrides, write_toy_checkpoints
from torch.utils.data import DataLoader

from sdi_pipeline.attribute import attribute
from sdi_pipeline.engine.spec import SketchSpec
from sdi_pipeline.errors import SDIError
from sdi_pipeline.examples.models import ARCHITECTURES
from sdi_pipeline.examples.train import train_example
from sdi_pipeline.formats.results import Results
from sdi_pipeline.inputs import build
from sdi_pipeline.jobs.merge import run_merge
from sdi_pipeline.jobs.worker import run_worker
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.compose import compose_config, conf_dir
from sdi_pipeline.launch.slurm import jobs_path
from sdi_pipeline.launch.status import format_status, run_status
from sdi_pipeline.run.rundir import RunDir

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    for group in ("model", "data", "checkpoints", "sketch", "launcher", "wandb")
}


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_config_composes_and_instantiates(tmp_path, group: str, option: str) -> None:
    overrides = cli_overrides(tmp_path)
    if option == "tokens":
        np.save(tmp_path / "tokens.npy", np.arange(60).reshape(6, 10) % 3)
        overrides += [
            f"data.train.path={tmp_path}/tokens.npy",
            f"data.query.path={tmp_path}/tokens.npy",
        ]
    if group == "model" and option in ARCHITECTURES:  # the examples name their own checkpoints
        pytest.importorskip("transformers")
        train_example(option, tmp_path / "ex", steps=2, n_checkpoints=1, progress=False)
        overrides += [f"checkpoints.paths=[{tmp_path}/ex/ckpt-*.pt]"]
    cfg = compose_config([*overrides, f"{group}={option}"])
    assert cfg[group] is not None
    model = build.build_model(cfg)
    assert callable(build.build_loss(cfg))
    for which in ("train", "query"):
        assert len(build.build_dataset(cfg, which)) > 0
    assert sum(p.numel() for p in model.parameters()) > 0


def _engine(run: RunDir):
    cfg = run.load_config()
    return attribute(
        build.build_model(cfg),
        list(cfg.analysis.targets),
        list(cfg.checkpoints.paths),
        DataLoader(build.build_dataset(cfg, "train"), batch_size=8),
        DataLoader(build.build_dataset(cfg, "query"), batch_size=8),
        build.build_loss(cfg),
        spec=SketchSpec(m=128),
    )


EDGES = "analysis.targets=[tok_emb,pos_emb,block,ln_f,head]"


def test_local_launcher_with_two_workers_equals_the_engine(tmp_path, capsys, monkeypatch) -> None:
    # Device discovery mocked in the launcher: two of a node's GPUs visible to it. Its
    # workers get one each (they see no CUDA here and run on the CPU).
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert attribute_main(cli_overrides(tmp_path, "launcher.workers=2", EDGES)) == 0
    out = capsys.readouterr().out
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    run = RunDir(run_path)
    assert "top 3 overall (TracIn)" in out and "plots:" in out
    # The loss is named, with the config group it came from, before the run and in the summary.
    loss = "sdi_pipeline.toy.parity.parity_loss (from data=parity)"
    assert f"[sdi] loss: {loss}\n" in out and f"\nloss: {loss}\n" in out
    assert (run.path / "plots" / "sdi_steps.png").stat().st_size > 10_000
    assert re.search(r"\[sdi\] 2 workers x \d+ threads on 2 GPUs \(4,6\):", out)
    for rank, gpu in enumerate(("4", "6")):  # every job's exact command line is in the run dir
        command = (run.path / "commands" / f"worker-{rank:04d}.sh").read_text()
        assert f"rank={rank} world_size=2" in command
        assert f"CUDA_VISIBLE_DEVICES={gpu} " in command
    expected = _engine(run)
    with Results.open(run.path) as res:
        assert res.slot_names[0] == "prelude" and res.slot_names[-1] == "readout"
        np.testing.assert_allclose(res.sdi[...], expected.sdi.numpy(), rtol=1e-4, atol=1e-4)
    # Running the same command again finds the finished run and recomputes nothing.
    marker = next(run.completions_dir.iterdir())
    before = marker.stat().st_mtime_ns
    assert attribute_main(cli_overrides(tmp_path, "launcher.workers=2", EDGES)) == 0
    assert marker.stat().st_mtime_ns == before


FAKE_SBATCH = """#!/usr/bin/env bash
# Records each submission (arguments and script) and answers like sbatch does.
n=$(ls "$SBATCH_LOG" | wc -l)
id=$((1000 + n))
{ echo "ARGS: $*"; cat "${@: -1}"; } > "$SBATCH_LOG/$id.txt"
echo "Submitted batch job $id"
"""


def test_slurm_launcher_submits_query_array_and_dependent_merge(tmp_path, monkeypatch) -> None:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    log_dir.mkdir()
    for tool, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log_dir))
    overrides = cli_overrides(
        tmp_path,
        "launcher=slurm",
        "launcher.array_size=3",
        "launcher.array_parallelism=2",
        "launcher.partition=gpu",
        "launcher.account=proj7",
        "launcher.time_min=30",
        "launcher.gpus_per_task=1",
        "launcher.cpus_per_task=6",
    )
    assert attribute_main(overrides) == 0
    subs = [p.read_text() for p in sorted(log_dir.iterdir())]
    assert len(subs) == 3
    query, array, merge = subs
    assert "--array" not in query and "sdi-query" in query
    assert re.search(r"#SBATCH --array=0-2%2", array)
    assert "#SBATCH --partition=gpu" in array and "#SBATCH --account=proj7" in array
    assert "#SBATCH --time=30" in array and "#SBATCH --cpus-per-task=6" in array
    assert re.search(r"#SBATCH --gpus-per-node=1", array)
    assert "#SBATCH --dependency=afterok:1000:1001" in merge
    assert "#SBATCH --kill-on-invalid-dep=yes" in merge
    # The three jobs pickle the same entry points a user runs by hand.
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    assert '"query": "1000"' in jobs_path(RunDir(run_path)).read_text()
    # sdi-status shows each job's state from sacct, and what to do after a failure.
    rows = ["1000|COMPLETED", "1001_0|COMPLETED", "1001_1|FAILED", "1001_2|COMPLETED",
            "1002|CANCELLED by 0"]  # fmt: skip
    (bin_dir / "sacct").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{r}'" for r in rows))
    (bin_dir / "sacct").chmod(0o755)
    text = format_status(RunDir(run_path), run_status(RunDir(run_path)))
    assert "query   1000 COMPLETED" in text, text
    assert "workers 1001_0 COMPLETED, 1001_1 FAILED, 1001_2 COMPLETED" in text, text
    assert "merge   1002 CANCELLED" in text, text
    assert "then run the same command again" in text, text


BAD = [
    ("sketch.m=0", "sketch.m must be positive, got 0"),
    ("launcher=pbs", "Could not find 'launcher/pbs'"),
    (
        "checkpoints.paths=[/nonexistent/ckpt-*.pt]",
        "checkpoint glob '/nonexistent/ckpt-*.pt' matches no file",
    ),
    ("analysis.targets=[blok]", "target pattern 'blok' matches no module"),
    ("sketch.mm=3", "unknown config key 'sketch.mm'. Did you mean m?"),
    (
        "launcher.worker=1",
        "unknown config key 'launcher.worker'. Did you mean workers? Valid keys of launcher: "
        "name, workers, threads_per_worker",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher=slurm", "launcher.partitio=gpu"],
            "unknown config key 'launcher.partitio'. Did you mean partition? Valid keys of "
            "launcher: name, array_size, array_parallelism, partition,",
        ),
        (
            ["launcher=prepare", "launcher.threads_per_worker=2"],
            "unknown config key 'launcher.threads_per_worker'. Valid keys of launcher: name, "
            "workers",
        ),
        (["sketchh.m=8"], "unknown config key 'sketchh.m'. Did you mean sketch? Valid keys at "),
    ],
)
def test_an_unknown_key_lists_the_valid_keys_of_the_chosen_group(overrides, message) -> None:
    with pytest.raises(SDIError) as err:
        compose_config(overrides)
    assert str(err.value).startswith(message), err.value


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_config_fails_before_submission_with_one_line(tmp_path, override, message) -> None:
    cmd = [sys.executable, "-c", "from sdi_pipeline.launch.attribute_cli import main; main()"]
    proc = subprocess.run(
        [*cmd, *cli_overrides(tmp_path), override], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "runs").exists()


def test_checkpoint_that_does_not_fit_the_model_fails_before_submission(tmp_path) -> None:
    overrides = cli_overrides(tmp_path)
    other = write_toy_checkpoints(tmp_path / "other", n=1)
    import torch

    data = torch.load(other[0], weights_only=True)
    data["model_state_dict"] = {k: v[..., :1] for k, v in data["model_state_dict"].items()}
    torch.save(data, tmp_path / "ckpts" / "ckpt-000009.pt")
    with pytest.raises(SDIError, match=r"ckpt-000009.pt does not fit the model: shape mismatches"):
        attribute_main(overrides)
    assert not (tmp_path / "runs").exists()


def test_conf_dir_is_the_repositorys(tmp_path) -> None:
    assert conf_dir() == Path(__file__).resolve().parents[1] / "conf"


def test_prepare_launcher_creates_the_run_and_prints_the_by_hand_commands(tmp_path, capsys) -> None:
    assert attribute_main(cli_overrides(tmp_path, "launcher=prepare", "launcher.workers=8")) == 0
    out = capsys.readouterr().out
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    assert f"sdi-worker run_dir={run_path} rank=R world_size=8" in out
    run = RunDir(run_path)
    assert run.config_path.exists() and not list(run.completions_dir.iterdir())


@pytest.mark.parametrize("script", sorted((conf_dir().parent / "slurm").glob("*.s*")))
def test_slurm_templates_are_valid_bash(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_a_training_set_that_changed_size_is_refused_by_every_job(tmp_path) -> None:
    rows = np.arange(60).reshape(6, 10) % 3
    np.save(tmp_path / "train.npy", rows)
    np.save(tmp_path / "query.npy", rows[:2])
    overrides = token_overrides(
        tmp_path, tmp_path / "train.npy", tmp_path / "query.npy", "launcher=prepare"
    )
    assert attribute_main(overrides) == 0
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    run = RunDir(run_path)
    assert run.recorded_train_size() == 6
    np.save(tmp_path / "train.npy", np.concatenate([rows, rows[:2]]))  # grew under the config
    with pytest.raises(SDIError, match=r"data\.train has 8 examples, but run"):
        attribute_main(overrides)
    for job in (lambda: run_worker(run_path, 0, 1), lambda: run_merge(run_path)):
        with pytest.raises(SDIError, match=r"was prepared with 6 \(train.size\)"):
            job()
    # sdi-status reads the recorded size: it needs neither the data nor its code.
    (tmp_path / "train.npy").unlink()
    assert len(run_status(run).missing) == 2


def _written(run: RunDir) -> dict[str, int]:
    """mtime of every file in the run directory."""
    return {str(p.relative_to(run.path)): p.stat().st_mtime_ns for p in run.path.rglob("*")}


def test_a_rerun_with_nothing_new_starts_no_job_and_a_changed_example_is_seen(
    tmp_path, capsys
) -> None:
    rows = np.arange(60).reshape(6, 10) % 3
    np.save(tmp_path / "train.npy", rows)
    np.save(tmp_path / "query.npy", rows[:2])
    overrides = token_overrides(
        tmp_path, tmp_path / "train.npy", tmp_path / "query.npy",
        "launcher.workers=1", "data.block_size=3",
    )  # fmt: skip
    assert attribute_main(overrides) == 0
    (run_path,) = (tmp_path / "runs" / "toy-parity").iterdir()
    run = RunDir(run_path)
    first = capsys.readouterr().out
    before = _written(run)
    assert attribute_main(overrides) == 0
    out = capsys.readouterr().out
    # Up to date: no job started (no log or command line written), results.h5 and the plots
    # not rewritten, the same summary printed.
    assert f"[sdi] run dir {run_path}: up to date (2 blocks x 2 checkpoints), nothing" in out
    assert _written(run) == before
    assert out.split("\nloss: ")[1] == first.split("\nloss: ")[1]
    # Plots drawn by older plotting code are drawn again; results.h5 stays.
    (run.path / "plots" / ".version").write_text("1\n")
    assert attribute_main(overrides) == 0
    redrawn = _written(run)
    plot = "plots/sdi_trajectories_query0.png"
    assert redrawn[plot] > before[plot]
    assert redrawn["results.h5"] == before["results.h5"]
    capsys.readouterr()
    # One example changed under the same config: not up to date; its block is recomputed.
    changed = rows.copy()
    changed[4, 3] = (changed[4, 3] + 1) % 3
    np.save(tmp_path / "train.npy", changed)
    assert attribute_main(overrides) == 0
    out = capsys.readouterr().out
    assert "up to date" not in out
    assert "training examples 3..5 changed" in out
    after = _written(run)
    assert after["results.h5"] != before["results.h5"]
    assert after["scores/block-00001.h5"] != before["scores/block-00001.h5"]
    assert after["scores/block-00000.h5"] == before["scores/block-00000.h5"]


def test_the_native_kernel_build_is_printed_by_sdi_attribute(capsys) -> None:
    from sdi_pipeline.launch.attribute_cli import _show_kernel_build

    _show_kernel_build()
    _show_kernel_build()  # once per process, however often it runs
    logging.getLogger("sdi_pipeline.engine.native").info("compiling the native kernel")
    assert capsys.readouterr().out == "[sdi] compiling the native kernel\n"
