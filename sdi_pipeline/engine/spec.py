"""The sketch specification: everything that determines the sketch map."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from sdi_pipeline.errors import ConfigError

KernelChoice = Literal["auto", "dense", "fft"]


@dataclass(frozen=True)
class SketchSpec:
    """Sketch size ``m``, hash ``seed`` and Linear-weight kernel.

    ``kernel="auto"`` picks, per layer and sequence length, the cheaper of the rFFT
    TensorSketch and the dense materialise-and-CountSketch kernel under a cost model whose
    constants are measured once per host (see :mod:`sdi_pipeline.engine.calibration`);
    both compute the same sketch (up to float rounding), so the choice never changes what
    is estimated. ``"dense"`` or ``"fft"`` forces one kernel everywhere.
    """

    m: int = 1024
    seed: int = 0
    kernel: KernelChoice = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m <= 0:
            raise ConfigError(f"sketch size m must be a positive integer, got {self.m!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"sketch seed must be an integer, got {self.seed!r}")
        if self.kernel not in ("auto", "dense", "fft"):
            raise ConfigError(
                f"sketch kernel must be 'auto', 'dense' or 'fft', got {self.kernel!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SketchSpec:
        return cls(m=int(data["m"]), seed=int(data["seed"]), kernel=data["kernel"])
