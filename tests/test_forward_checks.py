"""The job-side checks of the model's forward (engine/checks.py through the config): a
forward that is not deterministic or examples coupled within a batch are refused by the
preflight, before any run directory exists; analysis.loop_entry reaches the featurizer."""

from __future__ import annotations

import sys

import pytest
from pipeline_helpers import cli_overrides

from sdi_pipeline.errors import SDIError
from sdi_pipeline.formats.results import Results
from sdi_pipeline.launch.attribute_cli import run as attribute_main
from sdi_pipeline.launch.compose import compose_config
from sdi_pipeline.run.config import attribution_view, config_hash, train_hash

LOSSES = """
import torch
from sdi_pipeline.toy.parity import parity_loss

def noisy(model, batch):
    # A random term in the loss: the same weights give other losses on every call.
    loss = parity_loss(model, batch)
    return loss + 0.1 * torch.rand_like(loss)

def coupled(model, batch):
    # Each example's loss depends on its batch-mates through the batch mean.
    loss = parity_loss(model, batch)
    return loss - 0.5 * loss.mean()
"""


@pytest.fixture
def user_losses(tmp_path, monkeypatch):
    # The losses live in a --config-dir folder, where the jobs import factories from.
    (tmp_path / "myconf").mkdir()
    (tmp_path / "myconf" / "userlosses.py").write_text(LOSSES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("userlosses", None)


def _overrides(tmp_path, loss: str, *extra: str) -> list[str]:
    return [
        "--config-dir",
        str(tmp_path / "myconf"),
        *cli_overrides(
            tmp_path,
            f"analysis.loss._target_=userlosses.{loss}",
            "launcher.workers=1",
            "data.train.limit=16",
            *extra,
        ),
    ]


def test_a_forward_that_is_not_deterministic_is_refused_before_any_run(tmp_path, user_losses):
    with pytest.raises(SDIError) as err:
        attribute_main(_overrides(tmp_path, "noisy"))
    message = str(err.value)
    assert "\n" not in message and "not deterministic" in message
    assert "eval()" in message or "seed" in message  # the likely cause and its fix
    assert not (tmp_path / "runs").exists()


def test_coupled_examples_are_refused_unless_accepted(tmp_path, user_losses, capsys) -> None:
    with pytest.raises(SDIError) as err:
        attribute_main(_overrides(tmp_path, "coupled"))
    assert "\n" not in str(err.value)
    assert "analysis.allow_coupled_batch=true" in str(err.value)
    assert not (tmp_path / "runs").exists()
    # Accepted knowingly: the run completes, and says what it accepted.
    assert attribute_main(_overrides(tmp_path, "coupled", "analysis.allow_coupled_batch=true")) == 0
    with Results.open(tmp_path / "runs" / "toy-parity") as res:
        assert res.n_train == 16


def test_loop_entry_counts_in_the_run_id_only_when_set() -> None:
    plain = compose_config([])
    assert "loop_entry" not in attribution_view(plain)["analysis"]
    assert "allow_coupled_batch" not in attribution_view(plain)["analysis"]
    accepted = compose_config(["analysis.allow_coupled_batch=true"])
    assert config_hash(accepted) == config_hash(plain)  # a permission, not a result
    entry = compose_config(["analysis.loop_entry=block"])
    assert config_hash(entry) != config_hash(plain)
    assert train_hash(entry) != train_hash(plain)  # the train sketches' steps change too


def test_loop_entry_reaches_the_jobs_featurizer(tmp_path) -> None:
    from sdi_pipeline.jobs.context import JobContext

    overrides = cli_overrides(tmp_path, "analysis.loop_entry=nothing_like_this")
    with pytest.raises(SDIError, match=r"^loop_entry: "):
        _ = JobContext(compose_config(overrides)).featurizer
