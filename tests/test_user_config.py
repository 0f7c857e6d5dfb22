"""A user's own configs and code: which loss wins, importing factories, their errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from pipeline_helpers import cli_overrides, token_overrides

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.inputs.build import instantiate_node
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.compose import compose_config, loss_origin
from sdi_pipeline.run.config import config_hash
from sdi_pipeline.run.rundir import RunDir

# Modules the tests write; each test imports its own, and they are forgotten afterwards.
USER_MODULES = ("mylosses", "cwdfactory", "brokenfactory", "badimport", "raising")


@pytest.fixture(autouse=True)
def forget_user_modules(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in USER_MODULES:
        sys.modules.pop(name, None)


LOSSES = """
def square_loss(model, batch):
    return model(batch["input_ids"]).pow(2).mean(dim=(1, 2))
"""
MODEL_GROUP = """# @package _global_
model:
  _target_: sdi_pipeline.toy.checkpoints.model_from_checkpoints
  paths: ${checkpoints.paths}
analysis:
  targets: [block]
  loss: {_target_: mylosses.square_loss, _partial_: true}
"""

EXPERIMENT_GROUP = """# @package _global_
analysis:
  loss: {_target_: mylosses.square_loss, _partial_: true}
"""


def user_setup(tmp_path: Path) -> tuple[list[str], str]:
    """Token data, and a config dir whose model group (and an experiment group) set their
    own loss, from a module in the config dir."""
    rows = np.arange(60).reshape(6, 10) % 3
    np.save(tmp_path / "tokens.npy", rows)
    conf = tmp_path / "myconf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mylm.yaml").write_text(MODEL_GROUP)
    (conf / "experiment").mkdir()
    (conf / "experiment" / "sq.yaml").write_text(EXPERIMENT_GROUP)
    (conf / "mylosses.py").write_text(LOSSES)
    tokens = tmp_path / "tokens.npy"
    overrides = token_overrides(tmp_path, tokens, tokens, "launcher=prepare")
    return overrides, str(conf)


NEXT_TOKEN = "sdi_pipeline.inputs.losses.next_token_loss"
CASES = {
    "model group beats data group": (["model=mylm"], "mylosses.square_loss", "model=mylm"),
    "command line beats both": (
        ["model=mylm", f"analysis.loss._target_={NEXT_TOKEN}"],
        NEXT_TOKEN,
        "the command line",
    ),
    "data group alone: its default": ([], NEXT_TOKEN, "data=tokens"),
    "a group added on the command line": (
        ["+experiment=sq"],
        "mylosses.square_loss",
        "experiment=sq",
    ),
}


@pytest.mark.parametrize(("extra", "target", "origin"), CASES.values(), ids=CASES.keys())
def test_the_loss_used_is_the_one_set_and_its_origin_is_printed(
    tmp_path, capsys, extra, target, origin
) -> None:
    overrides, conf = user_setup(tmp_path)
    args = ["--config-dir", conf, *overrides, *extra]
    assert compose_config([*overrides, *extra], [conf]).analysis.loss._target_ == target
    assert loss_origin([*overrides, *extra], [conf]) == origin
    assert attribute_main(args) == 0
    assert f"[sdi] loss: {target} (from {origin})\n" in capsys.readouterr().out
    # A run of the user's model group is named after it, not after the demo's toy.
    name = "mylm" if "model=mylm" in extra else "toy-parity"
    (run_path,) = (tmp_path / "runs" / name).iterdir()
    assert RunDir(run_path).load_config().analysis.loss._target_ == target


def test_the_shipped_configs_keep_the_data_groups_loss() -> None:
    cfg = compose_config([])
    assert cfg.analysis.loss._target_ == "sdi_pipeline.toy.parity.parity_loss"
    assert loss_origin([]) == "data=parity"


def test_the_import_path_is_recorded_but_not_part_of_the_run_hash(tmp_path, monkeypatch) -> None:
    cfg = compose_config([])
    monkeypatch.chdir(tmp_path)
    elsewhere = compose_config([], [str(tmp_path)])
    assert elsewhere.runtime.python_path == [str(tmp_path)]
    assert cfg.runtime.python_path != elsewhere.runtime.python_path
    assert config_hash(cfg) == config_hash(elsewhere)


FACTORY = """
from sdi_pipeline.toy.checkpoints import model_from_checkpoints

def build(paths):
    return model_from_checkpoints(paths)
"""


def test_a_factory_in_the_working_directory_is_importable(tmp_path, monkeypatch, capsys) -> None:
    overrides = cli_overrides(tmp_path, "launcher=prepare", "model._target_=cwdfactory.build")
    (tmp_path / "cwdfactory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    assert attribute_main(overrides) == 0
    (run_path,) = (tmp_path / "runs" / "build").iterdir()  # named after the factory
    assert str(tmp_path) in RunDir(run_path).load_config().runtime.python_path


BROKEN = """
def build(paths):
    import mypkg_not_installed  # the user's environment lacks their package
"""


def test_an_import_error_inside_a_factory_shows_the_missing_module_in_one_line(tmp_path) -> None:
    (tmp_path / "brokenfactory.py").write_text(BROKEN)
    overrides = cli_overrides(tmp_path, "model._target_=brokenfactory.build")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("sdi-attribute")), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        "error: cannot build the model (model._target_): ModuleNotFoundError: No module named "
        f"'mypkg_not_installed' (at {tmp_path}/brokenfactory.py:3)"
    )


SOURCES = {
    "badimport": "import mypkg_absent\n\ndef build():\n    pass\n",
    "raising": "def build():\n    raise ValueError('d_model must be even, got 7')\n",
}
ERRORS = {
    "an import in the factory's module": (
        "badimport.build",
        r"ModuleNotFoundError: No module named 'mypkg_absent' \(at .*badimport\.py:1\)$",
    ),
    "the factory's own exception": (
        "raising.build",
        r"ValueError: d_model must be even, got 7 \(at .*raising\.py:2\)$",
    ),
    "a module that does not exist": (
        "nopkg.models.build",
        r"No module named 'nopkg' \(_target_: nopkg\.models\.build\); factories are imported "
        r"from installed packages, the working directory and --config-dir folders$",
    ),
    "a factory missing from its module": (
        "raising.biuld",
        r"module 'raising' has no attribute 'biuld' \(_target_: raising\.biuld\)$",
    ),
}


@pytest.mark.parametrize(("target", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_a_failing_factory_names_the_real_cause(tmp_path, target, message) -> None:
    for name, source in SOURCES.items():
        (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(ConfigError, match=r"^cannot build the model \(model\._target_\): ") as err:
        instantiate_node(OmegaConf.create({"_target_": target}), "the model (model._target_)")
    assert "\n" not in str(err.value) and "Error locating target" not in str(err.value)
    assert err.match(message)
