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


def test_cuda_costs_are_keyed_by_the_gpu_model_not_the_cpu_threads(cache, monkeypatch) -> None:
    """kernel=auto on CUDA, with the device discovery mocked: one set of constants per GPU
    model (a MIG slice apart from the whole GPU), measured once and read by later processes."""
    gpus = {0: ("NVIDIA H200", 132), 1: ("NVIDIA H200 MIG 1g.18gb", 16)}

    def props(device):
        return type("Props", (), {"multi_processor_count": gpus[device.index][1]})()

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: gpus[device.index][0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    whole, mig = torch.device("cuda", 0), torch.device("cuda", 1)
    key = calibration.cache_key(whole)
    assert key.endswith("-cuda12.9-NVIDIA_H200-132sm") and "threads" not in key
    assert calibration.cache_key(mig).endswith("-NVIDIA_H200_MIG_1g.18gb-16sm")
    torch.set_num_threads(2)
    try:
        assert calibration.cache_key(whole) == key  # the CPU threads do not matter on a GPU
    finally:
        torch.set_num_threads(1)
    measured = {whole: KernelCosts(5.0, 2.0), mig: KernelCosts(9.0, 4.0)}
    monkeypatch.setattr(calibration, "measure_costs", lambda device: measured[device])
    assert calibration.kernel_costs(whole) == KernelCosts(5.0, 2.0)
    assert calibration.kernel_costs(mig) == KernelCosts(9.0, 4.0)
    assert (cache / f"kernel-costs-{key}.json").is_file()
    assert len(list(cache.glob("kernel-costs-*.json"))) == 2

    def no_measuring(device):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "measure_costs", no_measuring)
    monkeypatch.setattr(calibration, "_by_key", {})  # a new process
    assert calibration.kernel_costs(whole) == KernelCosts(5.0, 2.0)
