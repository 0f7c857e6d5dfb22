"""Reading results.h5: top-k per query and step, SDI trajectories, per-step energy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from sdi_pipeline.errors import SDIError
from sdi_pipeline.merge import RESULTS_FORMAT, RESULTS_VERSION

Sign = Literal["positive", "negative"]


def find_results(path: str | Path) -> Path:
    """results.h5 for a file, a run directory, or a run name (its newest complete run)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "results.h5").is_file():
        return p / "results.h5"
    if p.is_dir():
        done = sorted(p.glob("*/results.h5"), key=lambda f: f.stat().st_mtime)
        if done:
            return done[-1]
        raise SDIError(f"{p} holds no complete run (no */results.h5): has the merge run?")
    raise SDIError(f"no results at {p}")


class Results:
    """Lazy access to a merged run. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as err:
            raise SDIError(f"cannot read {path}: {err}") from err
        if self._f.attrs.get("format") != RESULTS_FORMAT:
            raise SDIError(f"{path} is not an sdi-pipeline results file")
        if int(self._f.attrs.get("format_version", -1)) != RESULTS_VERSION:
            raise SDIError(f"{path} has results format {self._f.attrs.get('format_version')}")
        attrs = self._f.attrs
        self.slot_names: list[str] = json.loads(str(attrs["slot_names"]))
        self.etas: list[float] = json.loads(str(attrs["etas"]))
        self.n_train = int(str(attrs["n_train"]))
        self.n_query = int(str(attrs["n_query"]))

    @classmethod
    def open(cls, path: str | Path) -> Results:
        """Open results.h5 given it, its run directory, or a run name directory."""
        return cls(find_results(path))

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def tracin(self) -> h5py.Dataset:
        """(N_train, N_query) TracIn, read lazily (slice it)."""
        return self._f["tracin"]  # type: ignore[return-value]

    @property
    def has_sdi(self) -> bool:
        """Whether the full SDI tensor was kept (see merge.sdi_max_gb)."""
        return "sdi" in self._f

    @property
    def sdi(self) -> h5py.Dataset:
        """(N_train, N_query, slots) SDI, read lazily; absent when it was too large to keep."""
        if "sdi" not in self._f:
            raise SDIError(
                f"{self.path} has no full SDI tensor (it exceeded merge.sdi_max_gb); top-k, "
                "TracIn and diagnostics are there. Rerun the merge with a larger limit to keep it."
            )
        return self._f["sdi"]  # type: ignore[return-value]

    @property
    def sdi_matrix(self) -> h5py.Dataset:
        """(N_train, N_query, train slots, query slots), if the merge wrote it."""
        if "sdi_matrix" not in self._f:
            raise SDIError(f"{self.path} has no step matrix: merge with merge.step_matrix=true")
        return self._f["sdi_matrix"]  # type: ignore[return-value]

    def _slot(self, step: int | str | None) -> int | None:
        if step is None or isinstance(step, int):
            if isinstance(step, int) and not 0 <= step < len(self.slot_names):
                raise SDIError(f"step {step} out of range: slots are {self.slot_names}")
            return step
        if step not in self.slot_names:
            raise SDIError(f"no slot '{step}': slots are {self.slot_names}")
        return self.slot_names.index(step)

    def topk(
        self,
        query: int,
        k: int | None = None,
        step: int | str | None = None,
        sign: Sign = "positive",
    ) -> list[tuple[int, float]]:
        """(train index, score) of the top-k training examples for ``query``.

        By TracIn when ``step`` is None, else by SDI at that slot (index or name such as
        ``"step 3"``); ``sign="negative"`` gives the most negative first.
        """
        if sign not in ("positive", "negative"):
            raise SDIError(f"sign must be 'positive' or 'negative', got {sign!r}")
        if not 0 <= query < self.n_query:
            raise SDIError(f"query {query} out of range (0..{self.n_query - 1})")
        slot = self._slot(step)
        group = self._f[f"topk/{'overall' if slot is None else 'per_step'}/{sign}"]
        idx = np.asarray(group["indices"][query])  # type: ignore[index]
        scores = np.asarray(group["scores"][query])  # type: ignore[index]
        if slot is not None:
            idx, scores = idx[slot], scores[slot]
        stored = len(idx)
        if k is not None and k > stored:
            raise SDIError(f"only the top {stored} were kept (merge.topk); asked for {k}")
        return [(int(i), float(s)) for i, s in zip(idx[:k], scores[:k], strict=True)]

    def trajectory(self, train_idx: int, query_idx: int) -> np.ndarray:
        """SDI of one (train, query) pair across slots; sums to their TracIn."""
        return np.asarray(self.sdi[train_idx, query_idx])

    def energy(self) -> np.ndarray:
        """(N_query, slots): sum over training examples of |SDI|."""
        return np.asarray(self._f["diagnostics/energy"])

    def signed_share(self) -> np.ndarray:
        """(N_query, slots): signed share of each slot in the query's total influence."""
        return np.asarray(self._f["diagnostics/signed_share"])

    def diagnostics(self) -> dict[str, Any]:
        """All diagnostics arrays (energy, shares, sketch norms, losses, per-unit throughput)."""
        out: dict[str, Any] = {}
        group = self._f["diagnostics"]
        assert isinstance(group, h5py.Group)
        group.visititems(
            lambda name, obj: (
                out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None
            )
        )
        return out

    def to_xarray(self) -> Any:
        """An xarray Dataset of TracIn, SDI (if stored) and energy; needs xarray installed."""
        try:
            import xarray as xr  # pyright: ignore[reportMissingImports]
        except ImportError as err:
            raise SDIError("to_xarray() needs xarray: pip install xarray") from err
        data: dict[str, Any] = {
            "tracin": (("train", "query"), np.asarray(self.tracin)),
            "energy": (("query", "slot"), self.energy()),
        }
        if "sdi" in self._f:
            data["sdi"] = (("train", "query", "slot"), np.asarray(self._f["sdi"]))
        return xr.Dataset(data, coords={"slot": self.slot_names})
