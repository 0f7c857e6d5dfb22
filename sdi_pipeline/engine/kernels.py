"""Per-example sketch kernels: CountSketch, TensorSketch (rFFT) and its dense equivalent.

All kernels take per-example tensors with the batch on dim 0 and return a (B, m) float32
sketch. For an ``nn.Linear`` weight the per-example gradient is ``sum_t delta_t x_t^T``;
its TensorSketch is ``sum_t CS_out(delta_t) (*) CS_in(x_t)`` (circular convolution), which
the FFT kernel computes without forming the d_out x d_in matrix. The dense kernel forms that
matrix with one batched matmul and CountSketches it under the *induced* hash
``(h_out(i) + h_in(j)) mod m`` with sign ``s_out(i) s_in(j)``: the same linear map, so both
kernels agree up to float rounding and the choice between them is only a matter of cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sdi_pipeline.engine.hashing import CountSketchHash
from sdi_pipeline.engine.native import dense_sketch_op

LinearKernel = Literal["fft", "dense"]

# Costs in units of one batched-matmul multiply-add, fitted on a 2-core x86 CPU with
# tools/bench/calibrate_kernels.py: a scattered add into the sketch costs about
# SCATTER_COST units, and one token through the FFT path (two CountSketches, two rFFTs of
# length m, the spectral product) about FFT_COST * m * log2(m). Matmuls are so much more
# efficient than FFTs that the dense kernel wins unless d_out * d_in is large against m.
# kernel="auto" uses constants measured on the machine at hand (engine/calibration.py);
# these are its fallback.
SCATTER_COST = 100.0
FFT_COST = 60.0
# Largest per-chunk intermediate (elements) the kernels allocate before splitting work.
MAX_CHUNK_ELEMENTS = 1 << 25


def count_sketch(values: torch.Tensor, h: CountSketchHash) -> torch.Tensor:
    """CountSketch each row of ``values`` (N, d) into (N, m)."""
    out = values.new_zeros(values.shape[0], h.m)
    count_sketch_add(out, values, h)
    return out


def count_sketch_add(out: torch.Tensor, values: torch.Tensor, h: CountSketchHash) -> None:
    """Add the CountSketch of each row of ``values`` (N, d) into ``out`` (N, m), in place.

    Scattering straight into the output spares a zeroed temporary and an add per call."""
    out.index_add_(1, h.buckets, values * h.signs)


class Workspace:
    """One reusable float32 scratch buffer.

    Large fresh temporaries cost page faults on every call on the CPU; the dense kernel's
    materialised gradients reuse this buffer instead (calls are sequential in backward).
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        if self._buf is None or self._buf.device != device or self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.float32, device=device)
        return self._buf[:n].view(shape)


def linear_weight_dense(
    delta: torch.Tensor,
    x: torch.Tensor,
    row: CountSketchHash,
    col: CountSketchHash,
    buckets: torch.Tensor,
    out: torch.Tensor,
    workspace: Workspace,
) -> None:
    """Add the sketch of per-example ``delta^T x`` (B, d_out, d_in) into ``out`` (B, m).

    ``delta`` is (B, T, d_out), ``x`` is (B, T, d_in). On the CPU the native kernel
    (:mod:`~sdi_pipeline.engine.native`) does it in one pass where it could be built.
    Otherwise: the induced signs factor as ``s_row(i) s_col(j)``, so they are applied to
    ``delta`` and ``x`` before the matmul and the materialised gradient only needs a scatter
    into ``buckets`` (the induced ones, see
    :func:`~sdi_pipeline.engine.hashing.induced_buckets`). Examples are processed in chunks
    so the gradients never exceed ``MAX_CHUNK_ELEMENTS``.
    """
    b, _, d_out = delta.shape
    d_in = x.shape[2]
    if delta.device.type == "cpu" and out.stride(1) == 1:
        op = dense_sketch_op()
        if op is not None:
            op(
                out,
                delta.contiguous(),
                x.contiguous(),
                row.buckets,
                row.signs,
                col.buckets,
                col.signs,
            )
            return
    signed_delta = (delta * row.signs).transpose(1, 2)
    signed_x = x * col.signs
    step = max(1, min(b, MAX_CHUNK_ELEMENTS // (d_out * d_in)))
    for start in range(0, b, step):
        stop = min(b, start + step)
        grads = workspace.take((stop - start, d_out, d_in), delta.device)
        torch.bmm(signed_delta[start:stop], signed_x[start:stop], out=grads)
        out[start:stop].index_add_(1, buckets, grads.view(stop - start, d_out * d_in))


def linear_weight_fft(
    delta: torch.Tensor, x: torch.Tensor, h_out: CountSketchHash, h_in: CountSketchHash
) -> torch.Tensor:
    """TensorSketch of per-example ``sum_t delta_t x_t^T`` via rFFT, tokens in chunks.

    Per token, CS_out(delta_t) and CS_in(x_t) are transformed; their spectra are
    multiplied, summed over tokens (linearity) and transformed back once per example.
    """
    b, t, d_out = delta.shape
    d_in = x.shape[2]
    m = h_out.m
    n_freq = m // 2 + 1
    tokens_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, b * m))
    spectrum = torch.zeros(b, n_freq, dtype=torch.complex64, device=delta.device)
    for start in range(0, t, tokens_per_chunk):
        stop = min(t, start + tokens_per_chunk)
        n = stop - start
        cs_d = count_sketch(delta[:, start:stop].reshape(b * n, d_out), h_out)
        cs_x = count_sketch(x[:, start:stop].reshape(b * n, d_in), h_in)
        f_d = torch.fft.rfft(cs_d, n=m).reshape(b, n, n_freq)
        f_x = torch.fft.rfft(cs_x, n=m).reshape(b, n, n_freq)
        spectrum += (f_d * f_x).sum(dim=1)
    return torch.fft.irfft(spectrum, n=m)


def embedding_weight(
    ids: torch.Tensor,
    delta: torch.Tensor,
    h_row: CountSketchHash,
    h_col: CountSketchHash,
    padding_idx: int | None,
    out: torch.Tensor,
) -> None:
    """TensorSketch of the per-example embedding gradient ``sum_t e_{id_t} delta_t^T``.

    CS_row of a one-hot row is a signed unit vector, and convolving with it is a signed
    cyclic shift, so the TensorSketch reduces to scattering each ``delta_t[j]`` into bucket
    ``(h_row(id_t) + h_col(j)) mod m``: exact, with no FFT and no (vocab x d) matrix.
    ``ids`` is (B, T) int64, ``delta`` (B, T, d); the sketch is added into ``out`` (B, m).
    """
    b = delta.shape[0]
    if b == 0:
        return
    m = h_row.m
    row_bucket = h_row.buckets[ids]  # (B, T)
    row_sign = h_row.signs[ids]
    if padding_idx is not None:
        # The padding row never receives gradient in nn.Embedding.
        row_sign = row_sign * (ids != padding_idx).to(row_sign.dtype)
    buckets = (row_bucket[:, :, None] + h_col.buckets[None, None, :]) % m  # (B, T, d)
    values = delta * (row_sign[:, :, None] * h_col.signs[None, None, :])
    # One flat scatter over the storage ``out`` views, which may be a strided slot view of
    # a (B, slots, m) buffer: element (b, k) lives at b * stride(0) + k * stride(1).
    row_stride, col_stride = out.stride()
    flat = out.as_strided(((b - 1) * row_stride + (m - 1) * col_stride + 1,), (1,))
    offsets = torch.arange(b, device=delta.device)[:, None, None] * row_stride
    flat.index_add_(0, (buckets * col_stride + offsets).reshape(-1), values.reshape(-1))


@dataclass(frozen=True)
class KernelCosts:
    """The cost model's machine constants, in units of one batched-matmul multiply-add:
    one scattered add (``scatter``), one FFT-path token per m log2 m (``fft``)."""

    scatter: float = SCATTER_COST
    fft: float = FFT_COST


def linear_kernel_costs(
    tokens: int, d_out: int, d_in: int, m: int, costs: KernelCosts = KernelCosts()
) -> dict[str, float]:
    """Estimated per-example cost of each Linear-weight kernel, in matmul multiply-adds."""
    dense = tokens * d_out * d_in + costs.scatter * d_out * d_in
    transform = costs.fft * m * math.log2(max(m, 2))
    fft = tokens * (transform + costs.scatter * (d_out + d_in)) + transform
    return {"dense": dense, "fft": fft}


def choose_linear_kernel(
    tokens: int, d_out: int, d_in: int, m: int, costs: KernelCosts = KernelCosts()
) -> LinearKernel:
    """The cheaper kernel for these shapes under ``costs``; either gives the same sketch."""
    estimates = linear_kernel_costs(tokens, d_out, d_in, m, costs)
    return "dense" if estimates["dense"] <= estimates["fft"] else "fft"
