"""The launcher table, and the defaults jobs take from their SLURM environment."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.inputs.build import pick_device
from sdi_pipeline.jobs.allocation import (
    allocated_cpus,
    array_task_count,
    array_task_id,
    local_rank,
)
from sdi_pipeline.launch import slurm
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.cli import JOBS
from sdi_pipeline.launch.compose import compose_config, conf_dir
from sdi_pipeline.launch.launchers import LAUNCHERS
from sdi_pipeline.launch.local import worker_gpus
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


def test_local_workers_get_one_gpu_each_round_robin_over_the_visible_ones() -> None:
    assert worker_gpus(4, 4, None) == ["0", "1", "2", "3"]
    assert worker_gpus(3, 2, None) == ["0", "1", "0"]  # more workers than GPUs: shared
    assert worker_gpus(2, 1, None) == ["0", "0"]
    # The launcher's own CUDA_VISIBLE_DEVICES is respected: physical ids, UUIDs, MIG ids.
    assert worker_gpus(3, 2, "2,3") == ["2", "3", "2"]
    assert worker_gpus(2, 2, "GPU-aa, MIG-bb") == ["GPU-aa", "MIG-bb"]
    # torch sees only the entries it can use: the list is cut to the count.
    assert worker_gpus(2, 1, "5,-1,6") == ["5", "5"]
    assert worker_gpus(2, 0, None) == [] and worker_gpus(2, 0, "") == []


def _runtime(device: str) -> DictConfig:
    return OmegaConf.create({"runtime": {"device": device}})


def test_a_job_takes_the_gpu_of_its_local_rank_among_those_it_sees(monkeypatch) -> None:
    for var in ("SLURM_LOCALID", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert local_rank() == 2
    monkeypatch.setenv("SLURM_LOCALID", "3")  # SLURM's wins
    assert local_rank() == 3
    # Device discovery mocked: a node with 4 GPUs, every task seeing all of them.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device(_runtime("auto"), 0) == torch.device("cuda", 0)
    assert pick_device(_runtime("cuda"), 3) == torch.device("cuda", 3)
    assert pick_device(_runtime("auto"), 5) == torch.device("cuda", 1)
    assert pick_device(_runtime("cpu"), 3) == torch.device("cpu")
    # Each task bound to its own GPU (gres, the local launcher): it sees one, GPU 0.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device(_runtime("auto"), 3) == torch.device("cuda", 0)


def test_no_gpu_means_the_cpu_or_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(_runtime("auto"), 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"runtime\.device=cuda but no CUDA device is visible"):
        pick_device(_runtime("cuda"))
