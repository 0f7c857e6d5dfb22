"""User mistakes raise the SDIError subclass of their kind (the CLIs print any of them)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sdi_pipeline.errors import CheckpointError, ConfigError, DataError, RunDirError
from sdi_pipeline.inputs import build
from sdi_pipeline.inputs.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.launch.cli import parse_kv
from sdi_pipeline.launch.compose import compose_config
from sdi_pipeline.launch.slurm import launch_slurm
from sdi_pipeline.run import config
from sdi_pipeline.run.rundir import RunDir


def test_a_bad_command_line_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="arguments are key=value pairs, got 'rank'"):
        parse_kv(["rank"], ["run_dir"])


def test_an_unknown_config_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'sketch\.mm'"):
        compose_config(["sketch.mm=3"])


def test_a_directory_without_a_config_is_a_run_dir_error(tmp_path) -> None:
    with pytest.raises(RunDirError, match="is this a run directory made by sdi-attribute"):
        config.load(tmp_path / "config.yaml")


def test_an_empty_dataset_is_a_data_error() -> None:
    cfg = OmegaConf.create({"data": {"train": {"_target_": "builtins.list"}}})
    with pytest.raises(DataError, match=r"data\.train is empty"):
        build.build_dataset(cfg, "train")


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint_paths([str(tmp_path / "ckpt.pt")])


def test_submitting_without_sbatch_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="launcher=slurm needs SLURM's sbatch and srun"):
        launch_slurm(RunDir(tmp_path), OmegaConf.create(), 0)
