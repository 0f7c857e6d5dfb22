"""The launcher table: every launcher composes, and only the table's names are accepted."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sdi_pipeline.attribute_cli import run as attribute_main
from sdi_pipeline.compose import compose_config, conf_dir
from sdi_pipeline.errors import SDIError
from sdi_pipeline.launchers import LAUNCHERS


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
    with pytest.raises(SDIError) as err:
        compose_config(["launcher.name=pbs"])
    assert str(err.value) == f"launcher.name='pbs' is not one of {', '.join(LAUNCHERS)}"
    assert list(LAUNCHERS) == ["local", "slurm", "prepare"]
