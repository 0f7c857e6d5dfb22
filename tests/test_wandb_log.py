"""W&B logging: the offline run files hold exactly results.h5's numbers; disabled costs nothing.

wandb 0.31 offline writes, under ``<run>/wandb/offline-run-<time>-<id>/``:

* ``run-<id>.wandb``: the transaction log that ``wandb sync`` uploads. It is LevelDB-log
  framed (a 7-byte file header ``:W&B`` + magic 0xBEE1 + version, then 32 KiB blocks of
  chunks with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST) around
  serialized ``wandb_internal_pb2.Record`` protobufs: the run (config, group, job type),
  history steps, summary updates, artifacts, exit code. wandb 0.31 no longer ships a Python
  reader (the old ``wandb.sdk.internal.datastore`` moved into the Go wandb-core), so
  :func:`read_records` below decodes the framing and wandb's own protobuf parses each record.
* ``files/media/table/<key>_<step>_<hash>.table.json``: each logged wandb.Table as
  ``{"columns": [...], "data": [[...], ...]}``, its path given in the history record;
  ``files/media/images/...png`` the same for images. Offline there is no
  ``files/wandb-summary.json`` or ``config.yaml``: summary and config live only in the log.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from pipeline_helpers import run_all, toy_config

from sdi_pipeline.formats.results import Results
from sdi_pipeline.report.plots import plot_step_profiles
from sdi_pipeline.report.wandb_log import WandbLogger
from sdi_pipeline.run.rundir import RunDir, prepare_run

# -- reading wandb's offline files ----------------------------------------------------------

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """All ``Record`` protobufs of a ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if pos + _HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:  # zero padding at the end of the last block
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()  # pyright: ignore[reportAttributeAccessIssue] (generated)
            record.ParseFromString(pending)
            records.append(record)
    return records


def _set(target: dict[str, Any], item: Any) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def _read_finished(folder: Path, timeout_s: float = 60.0) -> OfflineRun:
    """The offline run in ``folder``, once its log holds the exit record (a finished run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = OfflineRun.read(folder)
        kinds = [r.WhichOneof("record_type") for r in run.records]
        if "exit" in kinds:
            return run
        assert time.monotonic() < deadline, f"{folder}: no exit record after {timeout_s}s: {kinds}"
        time.sleep(0.2)


@dataclass
class OfflineRun:
    """What one offline W&B run recorded, decoded."""

    folder: Path
    records: list[Any]
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> OfflineRun:
        (log_file,) = folder.glob("run-*.wandb")
        out = cls(folder, read_records(log_file))
        for record in out.records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                for item in record.run.config.update:
                    _set(out.config, item)
            elif kind == "config":
                for item in record.config.update:
                    _set(out.config, item)
            elif kind == "summary":
                for item in record.summary.update:
                    _set(out.summary, item)
            elif kind == "history":
                step: dict[str, Any] = {}
                for item in record.history.item:
                    _set(step, item)
                out.history.append(step)
        return out

    def one(self, kind: str) -> Any:
        (found,) = [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]
        return found

    def logged(self, key: str) -> Any:
        """The last value logged under ``key`` (a history item)."""
        values = [step[key] for step in self.history if key in step]
        assert values, f"{key} was never logged; logged: {sorted(set().union(*self.history))}"
        return values[-1]

    def table(self, key: str) -> tuple[list[str], list[list[Any]]]:
        """A logged wandb.Table's columns and rows, read from its JSON file."""
        ref = self.logged(key)
        assert ref["_type"] == "table-file"
        data = json.loads((self.folder / "files" / ref["path"]).read_text())
        return data["columns"], data["data"]


# -- the run, logged once for all the tests ----------------------------------------------


@dataclass
class Logged:
    run: RunDir
    merge: OfflineRun
    worker: OfflineRun
    unit_stats: list[dict[str, Any]]
    home: Path
    cwd: Path


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    tmp = tmp_path_factory.mktemp("wandb")
    run_all(toy_config(tmp))  # the jobs log nothing (W&B disabled) ...
    # ... then the same run, switched to offline W&B (not part of the config hash).
    run = prepare_run(toy_config(tmp, wandb={"mode": "offline", "project": "sdi-test"}))
    home, cwd = tmp / "home", tmp / "cwd"
    home.mkdir()
    cwd.mkdir()
    stats = [json.loads(p.read_text()) for p in sorted(run.completions_dir.iterdir())]
    with pytest.MonkeyPatch.context() as mp:
        # A fake home and working directory: the logger must write into neither.
        for var in [v for v in os.environ if v.startswith(("WANDB_", "XDG_"))]:
            mp.delenv(var)
        mp.setenv("HOME", str(home))
        mp.setenv("MPLCONFIGDIR", str(tmp / "matplotlib"))  # its font cache is not W&B's
        mp.chdir(cwd)
        cfg = run.load_config()
        with WandbLogger(cfg, run, "merge", "merge") as wb:
            assert wb.enabled
            wb.log_merge(run.results_path)
        with (
            pytest.raises(RuntimeError, match="boom"),
            WandbLogger(cfg, run, "worker", "worker-0000") as wb,
        ):
            for unit in stats:
                wb.log_unit(unit)
            raise RuntimeError("boom")
        # wandb-core writes the transaction logs asynchronously and may still hold the
        # tail after run.finish() returns (a job's process exit waits for it in wandb's
        # atexit hook); the test process lives on, so wait for it as that hook does.
        import wandb

        wandb.teardown()
        # The logger's own settings are undone (wandb itself sets WANDB_SERVICE).
        ours = (
            "WANDB_CACHE_DIR",
            "WANDB_DATA_DIR",
            "WANDB_ARTIFACT_DIR",
            "WANDB_SILENT",
            "WANDB_ERROR_REPORTING",
        )
        assert not [v for v in ours if v in os.environ], "environment not restored"
    offline = [_read_finished(p) for p in sorted((run.path / "wandb").glob("offline-run-*"))]
    by_job = {o.one("run").job_type: o for o in offline}
    assert sorted(by_job) == ["merge", "worker"]
    return Logged(run, by_job["merge"], by_job["worker"], stats, home, cwd)


# -- tests ---------------------------------------------------------------------------------


def test_energy_and_signed_share_tables_hold_every_query_and_slot(logged: Logged) -> None:
    with Results.open(logged.run.path) as res:
        expected = {"sdi/energy": res.energy(), "sdi/signed_share": res.signed_share()}
        slots = res.slot_names
    for key, values in expected.items():
        columns, rows = logged.merge.table(key)
        assert columns == ["query", "slot", "value"]
        got = {(q, slot): v for q, slot, v in rows}
        assert len(got) == len(rows) == values.size
        for (j, t), value in np.ndenumerate(values):
            assert got[(j, slots[t])] == float(value), (key, j, slots[t])


def test_topk_tables_match_results_overall_and_per_step(logged: Logged) -> None:
    with Results.open(logged.run.path) as res:
        for scope in ("overall", "per_step"):
            for sign in ("positive", "negative"):
                columns, rows = logged.merge.table(f"topk/{scope}/{sign}")
                assert columns == ["query", "slot", "rank", "train_index", "score"]
                got: dict[tuple[int, str], list[tuple[int, int, float]]] = defaultdict(list)
                for q, slot, rank, idx, score in rows:
                    got[(q, slot)].append((rank, idx, score))
                steps = [None] if scope == "overall" else list(range(len(res.slot_names)))
                assert len(got) == res.n_query * len(steps)
                for j in range(res.n_query):
                    for step in steps:
                        slot = "overall" if step is None else res.slot_names[step]
                        want = res.topk(j, step=step, sign=sign)  # type: ignore[arg-type]
                        assert got[(j, slot)] == [
                            (rank, i, s) for rank, (i, s) in enumerate(want, 1)
                        ], (scope, sign, j, slot)


def test_summary_config_and_run_identity(logged: Logged) -> None:
    run, merge = logged.run, logged.merge
    with Results.open(run.path) as res:
        s = merge.summary
        assert (s["n_train"], s["n_query"], s["n_slots"]) == (40, 5, len(res.slot_names))
        assert (res.n_train, res.n_query) == (40, 5)
        assert s["topk"] == 10
        assert s["sdi_stored"] is True
        assert s["coverage/units"] == len(logged.unit_stats) == 6
        assert s["coverage/examples"] == 2 * 40  # every example at both checkpoints
        energy, share = res.energy(), res.signed_share()
        for t, slot in enumerate(res.slot_names):
            assert s[f"energy/{slot}"] == float(energy[:, t].mean())
            assert s[f"signed_share/{slot}"] == float(share[:, t].mean())
        tracin = np.asarray(res.tracin[...], dtype=np.float64)
        assert s["tracin/min"] == tracin.min()
        assert s["tracin/max"] == tracin.max()
        np.testing.assert_allclose(s["tracin/mean"], tracin.mean(), rtol=1e-12)
        np.testing.assert_allclose(s["tracin/std"], tracin.std(), rtol=1e-9)
    cfg = OmegaConf.to_container(run.load_config(), resolve=True)
    assert isinstance(cfg, dict)
    for key, value in cfg.items():
        assert merge.config[str(key)] == value, key
    assert merge.config["config_hash"] == run.stored_hash()
    info = merge.one("run")
    assert (info.run_group, info.job_type, info.display_name) == (run.path.name, "merge", "merge")
    assert info.project == "sdi-test"
    assert merge.one("exit").exit_code == 0


def test_histogram_counts_every_tracin_score(logged: Logged) -> None:
    hist = logged.merge.logged("tracin/histogram")
    assert hist["_type"] == "histogram"
    bins, counts = np.asarray(hist["bins"]), np.asarray(hist["values"])
    with Results.open(logged.run.path) as res:
        tracin = np.asarray(res.tracin[...])
    assert counts.sum() == tracin.size
    assert bins[0] == tracin.min() and bins[-1] == tracin.max()
    np.testing.assert_array_equal(counts, np.histogram(tracin, bins=bins)[0])


def test_sketch_norm_and_units_tables(logged: Logged) -> None:
    with Results.open(logged.run.path) as res:
        diag = res.diagnostics()
        slots = res.slot_names
    columns, rows = logged.merge.table("sketch_norm/train")
    assert columns == ["checkpoint", "slot", "value"]
    train = diag["train_sketch_norm"]
    assert [v for _, _, v in rows] == [float(v) for v in train.ravel()]
    assert [(k, s) for k, s, _ in rows] == [(k, slots[t]) for (k, t), _ in np.ndenumerate(train)]
    columns, rows = logged.merge.table("sketch_norm/query")
    assert columns == ["checkpoint", "query", "slot", "value"]
    query = diag["query_sketch_norm"]
    assert rows == [[k, j, slots[t], float(v)] for (k, j, t), v in np.ndenumerate(query)]
    columns, rows = logged.merge.table("units")
    assert columns[:2] == ["unit", "examples"]
    by_name = {u["unit"]: u for u in logged.unit_stats}
    assert sorted(r[0] for r in rows) == sorted(by_name)
    for row in rows:
        assert row[1] == by_name[row[0]]["examples"]
        assert row[2] == by_name[row[0]]["seconds"]


def test_plots_are_logged_as_images(logged: Logged) -> None:
    keys = ["sdi/step_profiles"] + [f"sdi/trajectories/query_{j:05d}" for j in range(4)]
    for key in keys:
        ref = logged.merge.logged(key)
        assert ref["_type"] == "image-file"
        png = logged.merge.folder / "files" / ref["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_units_logged_and_failed_run_finished(logged: Logged) -> None:
    worker = logged.worker
    steps = [step for step in worker.history if "unit/examples" in step]
    assert [step["unit/examples"] for step in steps] == [u["examples"] for u in logged.unit_stats]
    assert [step["unit/seconds"] for step in steps] == [u["seconds"] for u in logged.unit_stats]
    assert [step["worker/units"] for step in steps] == list(range(1, 7))
    assert steps[-1]["worker/examples"] == 2 * 40
    assert worker.summary["unit/unit"] == logged.unit_stats[-1]["unit"]
    info = worker.one("run")
    assert (info.job_type, info.display_name) == ("worker", "worker-0000")
    assert worker.one("exit").exit_code == 1  # the block raised: finished as failed


def test_offline_writes_only_inside_the_run_directory(logged: Logged) -> None:
    assert list(logged.home.rglob("*")) == []
    assert list(logged.cwd.rglob("*")) == []
    # Table artifacts are staged for `wandb sync` inside the run dir, not in ~/.local/share.
    staged = [
        entry.local_path
        for record in logged.merge.records
        if record.WhichOneof("record_type") == "artifact"
        for entry in record.artifact.manifest.contents
    ]
    assert staged
    for path in staged:
        assert Path(path).is_relative_to(logged.run.path / "wandb"), path


def test_disabled_imports_nothing_and_writes_nothing(logged: Logged, tmp_path: Path) -> None:
    def snapshot(root: Path) -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")
        }

    run = logged.run
    before = snapshot(run.path)
    script = textwrap.dedent(
        """
        import sys
        from sdi_pipeline.run.rundir import RunDir
        from sdi_pipeline.report.wandb_log import WandbLogger

        run = RunDir(sys.argv[1])
        cfg = run.load_config()
        cfg.wandb.mode = "disabled"
        with WandbLogger(cfg, run, "worker", "worker-0001") as wb:
            assert not wb.enabled
            wb.log_unit({"examples": 16, "seconds": 0.5})
            wb.log({"x": 1.0})
            wb.log_merge(run.results_path)
        assert "wandb" not in sys.modules, "disabled mode imported wandb"
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script, str(run.path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert snapshot(run.path) == before
    assert list(tmp_path.iterdir()) == []


def test_profile_plot_without_the_full_sdi(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = plot_step_profiles(
        rng.random((7, 5)), rng.standard_normal((7, 5)), [f"step {t}" for t in range(5)],
        tmp_path / "p.png",
    )  # fmt: skip
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_jobs_log_under_their_job_types_grouped_by_run(tmp_path) -> None:
    run = run_all(toy_config(tmp_path, wandb={"mode": "offline", "project": "sdi-jobs"}))
    offline = [OfflineRun.read(p) for p in sorted((run.path / "wandb").glob("offline-run-*"))]
    runs = {o.one("run").job_type: o.one("run") for o in offline}
    assert sorted(runs) == ["merge", "query", "worker"]
    assert {r.run_group for r in runs.values()} == {run.path.name}
