"""The Linear-weight kernel cost model's machine constants, measured once per host.

``kernel="auto"`` picks the cheaper of the dense and the FFT kernel from
:func:`~sdi_pipeline.engine.kernels.linear_kernel_costs`, whose two constants (the cost of
one scattered add, and of one FFT-path token per m log2 m, in units of one batched-matmul
multiply-add) depend on the machine. :func:`kernel_costs` measures them the first time a
process needs them on a device, by timing both kernels on fixed synthetic shapes (well
under a second), and caches them in a small JSON file per host, torch version and device
(:func:`cache_key`: a CPU's thread count, a GPU's name), so later processes read them
instead (of processes measuring at the same time, the first to finish writes the file and
all use its constants). Where the file can be
neither read nor written, the constants fitted on the project's 2-core machine are used.

Both kernels compute the same linear map, so the constants only decide speed: sketches
differ by float rounding at most, whichever kernel ran.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from sdi_pipeline.engine.hashing import induced_buckets, make_count_sketch_hash
from sdi_pipeline.engine.host_cache import CACHE_ENV as CACHE_ENV  # re-exported
from sdi_pipeline.engine.host_cache import cache_dir
from sdi_pipeline.engine.kernels import (
    FFT_COST,
    SCATTER_COST,
    KernelCosts,
    Workspace,
    linear_weight_dense,
    linear_weight_fft,
)
from sdi_pipeline.engine.native import dense_sketch_op
from sdi_pipeline.errors import SDIError
from sdi_pipeline.files.atomic import create_exclusive, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: keyed by the dense kernel that runs (native or stock)
DEFAULT_COSTS = KernelCosts(scatter=SCATTER_COST, fft=FFT_COST)
# Probe shapes (batch, d_out, d_in, m): the dense kernel at two token counts separates its
# matmul from its scatter; the FFT kernel's transform cost is what remains of its time.
_DENSE_PROBE = (8, 128, 128, 4096)
# The native CPU kernel's cost per gradient entry has a part that only longer sequences tell
# apart from its multiply-adds (measured: with 4 and 64 tokens it chose FFT for layers where
# dense was 1.3-3x faster; calibrate_kernels.py shows the picks).
_DENSE_TOKENS = {"stock": (4, 64), "native": (16, 256)}
_FFT_PROBE = (8, 8, 64, 64, 4096)  # batch, tokens, d_out, d_in, m
_REPEATS = 9

# This process's constants by (device, thread count): the choice is made once per call.
_by_key: dict[tuple[torch.device, int], KernelCosts] = {}


def _dense_kernel(device: torch.device) -> str:
    """Which dense kernel runs on ``device``: ``native`` (CPU, where built) or ``stock``."""
    return "native" if device.type == "cpu" and dense_sketch_op() is not None else "stock"


def cache_key(device: torch.device) -> str:
    """What the constants depend on: host and torch version; on the CPU the thread count and
    whether the native dense kernel runs; on CUDA the GPU's name, its multiprocessor count (a
    MIG slice of a GPU is slower than the whole) and the CUDA version, not the CPU threads."""
    parts = [socket.gethostname(), f"torch{torch.__version__}"]
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        name = torch.cuda.get_device_name(device)
        parts += [f"cuda{torch.version.cuda}", name, f"{sms}sm"]
    else:
        parts += [f"{torch.get_num_threads()}threads", device.type, _dense_kernel(device)]
    return re.sub(r"[^A-Za-z0-9.+\-]", "_", "-".join(parts))


def kernel_costs(device: torch.device) -> KernelCosts:
    """The cost constants for ``device`` on this host: cached, else measured and cached.

    If the cache can neither be read nor written, :data:`DEFAULT_COSTS` (logged once).
    """
    memo = (device, torch.get_num_threads())
    if memo in _by_key:
        return _by_key[memo]
    key = cache_key(device)
    path = cache_dir() / f"kernel-costs-{key}.json"
    costs = _read(path)
    if costs is None:
        measured = measure_costs(device)
        record = {"version": CACHE_VERSION, "key": key, **asdict(measured)}
        try:
            # The first process to finish measuring wins, so workers started together on
            # one host all use the same constants; an unreadable file is replaced.
            if not create_exclusive(path, json.dumps(record)):
                costs = _read(path)
                if costs is None:
                    write_json_atomic(path, record)
            costs = costs or measured
        except (OSError, SDIError) as err:
            # Unsaved constants would be measured again, differently, by every process.
            log.warning("cannot cache kernel costs in %s (%s): using the defaults", path, err)
            costs = DEFAULT_COSTS
    _by_key[memo] = costs
    return costs


def _read(path: Path) -> KernelCosts | None:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION:
            return None
        costs = KernelCosts(scatter=float(data["scatter"]), fft=float(data["fft"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = all(math.isfinite(v) and v > 0 for v in (costs.scatter, costs.fft))
    return costs if ok else None


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of ``fn`` after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(_REPEATS):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_costs(device: torch.device) -> KernelCosts:
    """Time both kernels on the probe shapes and fit the cost model's two constants."""
    gen = torch.Generator().manual_seed(0)
    b, d_out, d_in, m = _DENSE_PROBE
    row = make_count_sketch_hash(0, "probe", "row", d_out, m).to(device)
    col = make_count_sketch_hash(0, "probe", "col", d_in, m).to(device)
    buckets = induced_buckets(row, col)
    out = torch.zeros(b, m, device=device)
    workspace = Workspace()
    tokens = _DENSE_TOKENS[_dense_kernel(device)]
    dense = []
    for t in tokens:
        delta = torch.randn(b, t, d_out, generator=gen).to(device)
        x = torch.randn(b, t, d_in, generator=gen).to(device)
        dense.append(
            _seconds(
                lambda delta=delta, x=x: linear_weight_dense(
                    delta, x, row, col, buckets, out, workspace
                ),
                device,
            )
        )
    # dense time = b * d_out * d_in * (tokens * per_mac + per_scatter)
    (t_lo, t_hi), (s_lo, s_hi) = tokens, dense
    per_mac = max(s_hi - s_lo, 1e-12) / (b * d_out * d_in * (t_hi - t_lo))
    per_scatter = max(s_lo / (b * d_out * d_in) - t_lo * per_mac, per_mac)
    b, t, d_out, d_in, m = _FFT_PROBE
    h_out = make_count_sketch_hash(0, "probe", "out", d_out, m).to(device)
    h_in = make_count_sketch_hash(0, "probe", "in", d_in, m).to(device)
    delta = torch.randn(b, t, d_out, generator=gen).to(device)
    x = torch.randn(b, t, d_in, generator=gen).to(device)
    fft = _seconds(lambda: linear_weight_fft(delta, x, h_out, h_in), device)
    # fft time = b * ((t + 1) * per_transform * m log2 m + t * per_scatter * (d_out + d_in))
    transforms = max(fft / b - t * per_scatter * (d_out + d_in), 1e-12)
    per_transform = transforms / ((t + 1) * m * math.log2(m))
    return KernelCosts(scatter=per_scatter / per_mac, fft=per_transform / per_mac)
