"""Stable CountSketch hashes derived from (seed, parameter name).

Every hash function the sketches use comes from here. The random bits are drawn from a
CPU ``torch.Generator`` seeded by a cryptographic digest of ``(seed, name, role)``, so the
same parameter gets the same buckets and signs in every process, on every device and
whatever order modules were registered in; nothing touches the global RNG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from sdi_pipeline.errors import ConfigError


def stable_seed(seed: int, name: str, role: str) -> int:
    """A 63-bit generator seed that depends only on ``seed``, ``name`` and ``role``."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class CountSketchHash:
    """A CountSketch map R^d -> R^m: coordinate ``i`` goes to ``buckets[i]`` with ``signs[i]``."""

    buckets: torch.Tensor  # (d,) int64 in [0, m)
    signs: torch.Tensor  # (d,) float32 in {-1, +1}
    m: int

    @property
    def dim(self) -> int:
        return int(self.buckets.numel())

    def to(self, device: torch.device) -> CountSketchHash:
        """The same hash with its tables on ``device`` (values are unchanged)."""
        if self.buckets.device == device:
            return self
        return CountSketchHash(self.buckets.to(device), self.signs.to(device), self.m)


def make_count_sketch_hash(seed: int, name: str, role: str, dim: int, m: int) -> CountSketchHash:
    """Draw a CountSketch hash for a ``dim``-dimensional input into ``m`` buckets, on the CPU."""
    if m <= 0:
        raise ConfigError(f"sketch size m must be positive, got {m}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, name, role))
    buckets = torch.randint(0, m, (dim,), generator=gen, dtype=torch.int64)
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(torch.float32) * 2 - 1
    return CountSketchHash(buckets, signs, m)


def induced_buckets(row: CountSketchHash, col: CountSketchHash) -> torch.Tensor:
    """Buckets of the CountSketch that ``row (x) col`` induces on a (rows x cols) matrix.

    Entry (i, j), flattened row-major, goes to bucket ``(h_row(i) + h_col(j)) mod m``; its
    sign is ``s_row(i) * s_col(j)`` (see :func:`induced_signs`). This is exactly the map the
    TensorSketch of an outer product applies, which is why the dense and FFT kernels agree.
    """
    return ((row.buckets[:, None] + col.buckets[None, :]) % row.m).reshape(-1)


def induced_signs(row: CountSketchHash, col: CountSketchHash) -> torch.Tensor:
    """Signs ``s_row(i) * s_col(j)`` of the induced matrix hash, flattened row-major."""
    return (row.signs[:, None] * col.signs[None, :]).reshape(-1)
