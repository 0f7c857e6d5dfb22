"""Checkpoint paths and globs are expanded by one function, strictly or not."""

from __future__ import annotations

import pytest

from sdi_pipeline.errors import SDIError
from sdi_pipeline.inputs.checkpoints import resolve_checkpoint_paths
from sdi_pipeline.toy.checkpoints import model_from_checkpoints


def _touch(*paths) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_patterns_keep_their_order_and_each_glob_is_sorted(tmp_path, monkeypatch) -> None:
    _touch(tmp_path / "b" / "c-2.pt", tmp_path / "b" / "c-1.pt", tmp_path / "a.pt")
    monkeypatch.chdir(tmp_path)
    found = resolve_checkpoint_paths(["b/c-*.pt", "a.pt"])
    assert found == [str(tmp_path / name) for name in ("b/c-1.pt", "b/c-2.pt", "a.pt")]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("none-*.pt", r"checkpoint glob '.*none-\*\.pt' matches no file"), ("x.pt", "not found")],
)
def test_strict_resolution_names_the_pattern_that_matches_nothing(
    tmp_path, pattern, message
) -> None:
    with pytest.raises(SDIError, match=message):
        resolve_checkpoint_paths([str(tmp_path / pattern)])


def test_lenient_resolution_keeps_paths_that_do_not_exist_yet(tmp_path) -> None:
    patterns = [str(tmp_path / "none-*.pt"), str(tmp_path / "later.pt")]
    assert resolve_checkpoint_paths(patterns, strict=False) == [str(tmp_path / "later.pt")]


def test_toy_model_before_its_checkpoints_exist_says_to_train_them(tmp_path) -> None:
    with pytest.raises(SDIError, match=r"no toy checkpoint found at .*run sdi-train-toy first"):
        model_from_checkpoints(str(tmp_path / "ckpts" / "ckpt-*.pt"))
