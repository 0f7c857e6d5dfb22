"""Every command and code block in README.md is exercised, so the README cannot rot.

- Each ``sdi-attribute`` line composes (group options and keys exist), with the README's
  own YAML example as the user's config dir.
- The by-hand job commands run against a real finished run.
- The Python blocks run, on toy checkpoints, loaders and a finished run.
- The two set-up commands name scripts that exist; what they run is tested elsewhere
  (tools/test.sh is CI itself; the demo's sdi-attribute path in test_attribute_cli).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pipeline_helpers import run_all, toy_config, write_toy_checkpoints
from torch.utils.data import DataLoader

from sdi_pipeline.launch.attribute_cli import HELP_TITLE
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.cli import JOBS
from sdi_pipeline.launch.compose import compose_config
from sdi_pipeline.launch.usage import common_options
from sdi_pipeline.toy.parity import make_parity_dataset, parity_loss

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined."""
    commands = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


COMMANDS = shell_commands()


def test_the_readme_has_the_commands_this_test_expects() -> None:
    programs = {c[0] for c in COMMANDS}
    assert {
        "bash",
        "sdi-attribute",
        "sdi-query",
        "sdi-worker",
        "sdi-merge",
        "sdi-status",
    } <= programs
    assert len([c for lang, c in BLOCKS if lang == "python"]) == 3


def test_the_commands_after_the_set_up_run_in_a_fresh_shell() -> None:
    """After the two set-up commands, the README activates .venv before its first tool
    command, and every tool it runs is one of the package's console scripts (which the
    set-up installs into .venv/bin). Where .venv exists (tools/test.sh made it), a fresh
    shell that sources it as written finds each of them there."""
    setup = [c for c in COMMANDS if c[0] == "bash"]
    assert setup == [["bash", "tools/demo.sh"], ["bash", "tools/test.sh"]]
    activate = COMMANDS.index(["source", ".venv/bin/activate"])
    assert COMMANDS[:activate] == setup
    tools = {c[0] for c in COMMANDS[activate + 1 :]}
    assert tools <= {"sdi-attribute", "sdi-query", "sdi-worker", "sdi-score", "sdi-merge",
                     "sdi-status", "sudo"}, tools  # fmt: skip
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = set(re.findall(r"^(sdi-[\w-]+) = ", pyproject, flags=re.M))
    assert tools - {"sudo"} <= scripts
    assert (
        'pip install --quiet --disable-pip-version-check -e ".${extra}"'
        in (ROOT / "tools" / "setup-env.sh").read_text()
    )
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        return  # no .venv here: tools/test.sh always has one
    shell = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c",
         "source .venv/bin/activate && command -v " + " ".join(sorted(tools - {"sudo"}))],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = shell.stdout.split()
    assert [Path(f).parent for f in found] == [ROOT / ".venv" / "bin"] * len(tools - {"sudo"})


def test_the_readme_lists_the_options_as_sdi_attribute_help_does(capsys) -> None:
    with pytest.raises(SystemExit):
        attribute_main(["--help"])
    help_text = capsys.readouterr().out
    listed = f"{HELP_TITLE}\n{common_options()}\n"
    assert listed in help_text
    assert f"```text\n{listed}```" in README


def test_setup_commands_name_existing_scripts() -> None:
    for cmd in (c for c in COMMANDS if c[0] == "bash"):
        assert (ROOT / cmd[1]).is_file(), cmd
    assert "bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()


def _user_config_dir(tmp_path: Path) -> Path:
    """The README's YAML example, saved where its `--config-dir myconf model=mylm` finds it."""
    (yaml,) = [body for lang, body in BLOCKS if lang == "yaml"]
    folder = tmp_path / "myconf" / "model"
    folder.mkdir(parents=True)
    (folder / "mylm.yaml").write_text(yaml)
    return tmp_path / "myconf"


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c[0] == "sdi-attribute"], ids=lambda c: " ".join(c[1:])
)
def test_every_sdi_attribute_line_composes(tmp_path, monkeypatch, command) -> None:
    monkeypatch.chdir(tmp_path)
    args, dirs = [], []
    words = iter(command[1:])
    for word in words:
        if word == "--config-dir":
            dirs.append(str(_user_config_dir(tmp_path) if next(words) == "myconf" else word))
        elif word != "--cfg":
            args.append(word)
    cfg = compose_config(args, dirs)
    for override in args:
        key, _, value = override.partition("=")
        key = key.lstrip("+")  # "+key=value" adds a key the group does not set
        if "." in key and not value.startswith("["):
            got = OmegaConf.select(cfg, key)
            shown = str(got).lower() if isinstance(got, bool) else str(got)  # YAML's spelling
            assert shown == value, override


def test_by_hand_commands_run_on_a_finished_run(tmp_path) -> None:
    run = run_all(toy_config(tmp_path), workers=1)
    for cmd in (
        c for c in COMMANDS if c[0] in ("sdi-query", "sdi-worker", "sdi-merge", "sdi-status")
    ):
        args = [a.replace("runs/toy-parity/<run-id>", str(run.path)) for a in cmd[1:]]
        assert JOBS[cmd[0].removeprefix("sdi-")](args) == 0, cmd


def test_python_blocks_run(tmp_path, monkeypatch) -> None:
    results_block, api_block, _bif_block = [body for lang, body in BLOCKS if lang == "python"]
    run = run_all(toy_config(tmp_path), workers=1)
    monkeypatch.chdir(tmp_path)
    exec(results_block.replace('"runs/toy-parity"', repr(str(run.path.parent))), {})

    for name, src in zip(
        ("ckpt-1.pt", "ckpt-2.pt"), write_toy_checkpoints(tmp_path / "c"), strict=True
    ):
        (tmp_path / name).write_bytes(src.read_bytes())
    data = make_parity_dataset(12, n_bits=6, seed=3)
    namespace = {
        "model": run_model(run),
        "train_loader": DataLoader(data, batch_size=4),
        "query_loader": DataLoader(data, batch_size=4),
        "loader": DataLoader(data, batch_size=4),
        "loss_fn": parity_loss,
    }
    exec(api_block, namespace)
    assert namespace["result"].sdi.shape == (12, 12, 4)
    assert isinstance(namespace["feats"].values, torch.Tensor)


def test_bif_python_block_runs(tmp_path, monkeypatch) -> None:
    *_, bif_block = [body for lang, body in BLOCKS if lang == "python"]
    cfg = toy_config(tmp_path, bif={"chains": 2, "draws": 3, "batch_size": 8, "lr": 1e-3})
    cfg["method"] = "bif"
    run = run_all(cfg, workers=1)
    monkeypatch.chdir(tmp_path)
    src = sorted((tmp_path / "ckpts").glob("ckpt-*.pt"))[0]
    (tmp_path / "ckpt.pt").write_bytes(src.read_bytes())
    data = make_parity_dataset(40, n_bits=6, seed=3)  # the block's SGLD batch is 32
    namespace = {
        "run_dir": run.path,
        "model": run_model(run),
        "train_ds": data,
        "query_ds": data,
        "loss_fn": parity_loss,
    }
    exec(bif_block, namespace)
    assert namespace["out"].bif.shape == (40, 40)


def run_model(run) -> torch.nn.Module:
    from sdi_pipeline.inputs.build import build_model

    return build_model(run.load_config())
