"""kernel="auto": the cost constants are measured once per host and cached, with a safe
fallback when the cache folder cannot be written."""

from __future__ import annotations

import json

import pytest
import torch

from sdi_pipeline.engine import calibration
from sdi_pipeline.engine.kernels import KernelCosts

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "_by_key", {})
    return tmp_path / "cache"


def test_costs_are_measured_once_then_read_from_the_cache(cache, monkeypatch) -> None:
    measured = calibration.kernel_costs(CPU)
    assert measured.scatter > 0 and measured.fft > 0
    (path,) = cache.glob("kernel-costs-*.json")
    assert calibration.cache_key(CPU) in path.name
    assert json.loads(path.read_text())["scatter"] == measured.scatter

    def no_measuring(device):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "measure_costs", no_measuring)
    monkeypatch.setattr(calibration, "_by_key", {})  # a new process
    assert calibration.kernel_costs(CPU) == measured


def test_a_corrupt_cache_file_is_measured_again(cache, monkeypatch) -> None:
    cache.mkdir()
    path = cache / f"kernel-costs-{calibration.cache_key(CPU)}.json"
    path.write_text('{"version": 1, "scatter": -1, "fft": "x"}')
    monkeypatch.setattr(calibration, "measure_costs", lambda device: KernelCosts(7.0, 3.0))
    assert calibration.kernel_costs(CPU) == KernelCosts(7.0, 3.0)
    assert json.loads(path.read_text())["scatter"] == 7.0


def test_an_unwritable_cache_falls_back_to_the_default_costs(cache, monkeypatch) -> None:
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the folder should be")
    monkeypatch.setattr(calibration, "measure_costs", lambda device: KernelCosts(7.0, 3.0))
    assert calibration.kernel_costs(CPU) == calibration.DEFAULT_COSTS


def test_the_first_process_to_measure_wins(cache, monkeypatch) -> None:
    cache.mkdir()
    path = cache / f"kernel-costs-{calibration.cache_key(CPU)}.json"
    real_measure = calibration.measure_costs

    def measured_while_another_process_wrote(device):
        # Another process on this host finishes its measurement first.
        record = {"version": calibration.CACHE_VERSION, "scatter": 5.0, "fft": 2.0}
        path.write_text(json.dumps(record))
        return real_measure(device)

    monkeypatch.setattr(calibration, "measure_costs", measured_while_another_process_wrote)
    assert calibration.kernel_costs(CPU) == KernelCosts(5.0, 2.0)
