"""The launcher table, and the defaults jobs take from their SLURM environment."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.jobs.allocation import allocated_cpus, array_task_count, array_task_id
from sdi_pipeline.launch import slurm
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.cli import JOBS
from sdi_pipeline.launch.compose import compose_config, conf_dir
from sdi_pipeline.launch.launchers import LAUNCHERS
from sdi_pipeline.run.rundir import RunDir


def test_every_conf_launcher_is_in_the_table() -> None:
    assert sorted(p.stem for p in (conf_dir() / "launcher").glob("*.yaml")) == sorted(LAUNCHERS)


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_every_launcher_composes(tmp_path, capsys, name: str) -> None:
    overrides = [f"run.root={tmp_path / 'runs'}", f"launcher={name}"]
    assert attribute_main([*overrides, "--cfg"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.launcher.name == name
    assert list(printed.launcher) == list(OmegaConf.structured(LAUNCHERS[name].schema))
    assert not (tmp_path / "runs").exists()


def test_an_unknown_launcher_name_is_one_line_listing_the_launchers() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["launcher.name=pbs"])
    assert str(err.value) == f"launcher.name='pbs' is not one of {', '.join(LAUNCHERS)}"
    assert list(LAUNCHERS) == ["local", "slurm", "prepare"]


SLURM_ENV = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_CPUS_PER_TASK")


def test_slurm_defaults_read_the_environment(monkeypatch) -> None:
    for var in SLURM_ENV:
        monkeypatch.delenv(var, raising=False)
    assert (array_task_id(), array_task_count(), allocated_cpus()) == (0, 1, None)
    for var, value in zip(SLURM_ENV, ("3", "8", "6"), strict=True):
        monkeypatch.setenv(var, value)
    assert (array_task_id(), array_task_count(), allocated_cpus()) == (3, 8, "6")


def test_sdi_worker_takes_rank_and_world_size_from_the_job_array(monkeypatch) -> None:
    monkeypatch.setattr(
        "sdi_pipeline.jobs.worker.run_worker", lambda _run_dir, rank, world: (rank, world)
    )
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert JOBS["worker"](["run_dir=x"]) == (3, 8)
    assert JOBS["worker"](["run_dir=x", "rank=1", "world_size=2"]) == (1, 2)


def test_a_run_never_submitted_to_slurm_has_no_slurm_status_lines(tmp_path) -> None:
    run = RunDir(tmp_path)
    assert slurm.status_lines(run, merged=False) == []
    assert slurm.slurm_jobs(run) is None
