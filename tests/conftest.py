"""Shared fixtures: a small seeded looped GPT and parity batches."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sdi_pipeline.engine.host_cache import CACHE_ENV, cache_dir
from sdi_pipeline.toy.model import LoopedGPT, LoopedGPTConfig
from sdi_pipeline.toy.parity import make_parity_dataset

torch.set_num_threads(1)


def make_model(n_loops: int = 4, seed: int = 0, d_model: int = 32) -> LoopedGPT:
    """A toy model with non-trivial weights (a plain small init makes gradients tiny)."""
    torch.manual_seed(seed)
    model = LoopedGPT(LoopedGPTConfig(d_model=d_model, n_heads=4, d_mlp=64, n_loops=n_loops))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def parity_batch(n: int, seed: int = 0, n_bits: int = 6) -> dict[str, torch.Tensor]:
    data = make_parity_dataset(n, n_bits=n_bits, seed=seed)
    return {"tokens": data.tokens, "target": data.targets}


@pytest.fixture(scope="session", autouse=True)
def _kernel_cost_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the measured kernel costs of kernel="auto" out of the user's cache folder
    (subprocesses inherit the variable). The native kernel's library is kept in the user's
    cache all the same, so that not every session compiles it (tests/test_native.py builds
    it in empty folders)."""
    libraries = cache_dir() / "native"
    libraries.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("kernel-costs")
    (cache / "native").symlink_to(libraries, target_is_directory=True)
    os.environ[CACHE_ENV] = str(cache)


@pytest.fixture(autouse=True)
def _no_job_logging_left() -> None:
    """Each test starts as a new process does: the log handlers a job run in-process put on
    the package's logger (its log file, stderr) are closed after the test."""
    yield
    logger = logging.getLogger("sdi_pipeline")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


# The numeric tests that take the ``device`` fixture run on the CPU always and on CUDA where
# a GPU is visible; the CUDA runs carry the ``cuda`` marker, so ``pytest -m cuda`` is the
# suite's CUDA subset (tools/bench/device_check.sh runs it).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="no CUDA device here (torch.cuda.is_available() is False)",
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a numeric test runs on: ``cpu``, and ``cuda`` where there is one."""
    return torch.device(request.param)


@pytest.fixture
def model() -> LoopedGPT:
    return make_model()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return parity_batch(6)
