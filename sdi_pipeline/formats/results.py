"""results.h5, format v4 (see docs/format.md): the one module that writes and reads it.

:func:`write_results` creates the file under a temporary name and renames it when the
writer's block completes; every dataset carries an HDF5 Fletcher-32 checksum, and the
``inputs`` group records what the file was made from (each unit's and query file's content
digest, the checkpoints' sha256, the data files' identities). :class:`Results` reads it
lazily (top-k per query and step, SDI trajectories, per-step energy, diagnostics);
:meth:`Results.open` refuses a results.h5 that is stale -- its run directory's units, query
files, checkpoints or data files changed since the merge. This module imports neither torch
nor the engine nor Hydra, so opening results is light.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from sdi_pipeline.errors import ConfigError, RunDirError
from sdi_pipeline.files.atomic import atomic_path
from sdi_pipeline.run.freshness import results_inputs, results_staleness, stale_message

RESULTS_FORMAT = "sdi-pipeline/results"
RESULTS_VERSION = 4
# Every dataset is chunked with a Fletcher-32 checksum, verified whenever it is read.
_CHECKED = {"fletcher32": True}
Sign = Literal["positive", "negative"]
# Per-unit statistics kept in diagnostics/units (from the units' completion markers).
UNIT_STATS = ("examples", "seconds", "examples_per_s", "peak_rss_mb", "rank")
# Scopes of the stored top-k: by TracIn, by SDI per slot, by SDI per (slot, query token).
TOPK_SCOPES = ("overall", "per_step", "per_token")


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
        raise RunDirError(f"{p} holds no complete run (no */results.h5): has the merge run?")
    raise RunDirError(f"no results at {p}")


def stale_reasons(path: str | Path) -> list[str]:
    """Why the results.h5 at ``path`` no longer matches its run directory (empty: it does,
    or it is not inside one). Cheap: markers, query file attributes, checkpoint digests
    from the run's cache, a stat of each data file; a dataset built in code is checked by
    the jobs and ``sdi-status verify=true``, not here."""
    try:
        with h5py.File(path, "r") as f:
            inputs = results_inputs(f)
    except OSError as err:
        return [f"it cannot be read ({err})"]
    return results_staleness(Path(path), inputs)


class Results:
    """Lazy access to a merged run. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fix = f"run sdi-merge run_dir={path.parent} (or the same sdi-attribute command) again"
        try:
            self._f = h5py.File(path, "r")
        except OSError as err:
            raise RunDirError(f"cannot read {path} ({' '.join(str(err).split())}): {fix}") from err
        if self._f.attrs.get("format") != RESULTS_FORMAT:
            self._f.close()
            raise RunDirError(f"{path} is not an sdi-pipeline results file")
        if int(self._f.attrs.get("format_version", -1)) != RESULTS_VERSION:
            version = self._f.attrs.get("format_version")
            self._f.close()
            raise RunDirError(
                f"{path} has results format {version}; this sdi-pipeline reads format "
                f"{RESULTS_VERSION}: {fix}"
            )
        attrs = self._f.attrs
        self.slot_names: list[str] = json.loads(str(attrs["slot_names"]))
        self.train_slot_names: list[str] = json.loads(str(attrs["train_slot_names"]))
        self.etas: list[float] = json.loads(str(attrs["etas"]))
        self.checkpoints: list[str] = json.loads(str(attrs["checkpoints"]))
        self.n_train = int(str(attrs["n_train"]))
        self.n_query = int(str(attrs["n_query"]))
        self.config_hash = str(attrs["config_hash"])
        self.k = int(str(attrs["topk"]))
        #: Which target modules went to which slots, in words.
        self.assignment = str(attrs["assignment"])
        #: "sdi" (TracIn / SDI) or "bif" (Bayesian influence from SGLD loss traces).
        self.method = str(attrs.get("method", "sdi"))

    @classmethod
    def open(cls, path: str | Path, *, allow_stale: bool = False) -> Results:
        """Open results.h5 given it, its run directory, or a run name directory.

        A results.h5 whose run directory or inputs changed since the merge (a unit, shard or
        query file recomputed or removed, a checkpoint rewritten, a data file named by
        ``data.train.path`` / ``data.query.path`` changed) is refused with what changed and
        the fix, unless ``allow_stale=True``, which opens it as it is. Cheap: a stat per
        file (a data file whose stat changed is hashed); no dataset is built.
        """
        res = cls(find_results(path))
        if not allow_stale:
            reasons = results_staleness(res.path, results_inputs(res._f))
            if reasons:
                res.close()
                raise RunDirError(
                    stale_message(res.path, reasons)
                    + "; Results.open(..., allow_stale=True) opens it as it is"
                )
        return res

    def inputs(self) -> dict[str, Any] | None:
        """What the merge combined: unit and query digests, checkpoints and their sha256."""
        return results_inputs(self._f)

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def tracin(self) -> h5py.Dataset:
        """(N_train, N_query) TracIn, read lazily (slice it)."""
        if "tracin" not in self._f:
            raise RunDirError(f"{self.path} is a method={self.method} run: it has no TracIn")
        return self._f["tracin"]  # type: ignore[return-value]

    @property
    def has_bif(self) -> bool:
        """Whether the run holds BIF (method=bif)."""
        return "bif" in self._f

    def _bif(self, name: str, how: str) -> h5py.Dataset:
        if not self.has_bif:
            raise RunDirError(f"{self.path} has no BIF: run sdi-attribute method=bif")
        if name not in self._f["bif"]:  # type: ignore[operator]
            raise RunDirError(f"{self.path} has no bif/{name}: {how}")
        return self._f[f"bif/{name}"]  # type: ignore[return-value]

    @property
    def bif(self) -> h5py.Dataset:
        """(N_train, N_query) BIF summed over checkpoints with eta, read lazily."""
        return self._bif("scores", "")

    @property
    def bif_checkpoints(self) -> h5py.Dataset:
        """(N_train, checkpoints, N_query) BIF at each checkpoint (not weighted)."""
        return self._bif("checkpoints", "")

    @property
    def bif_query_tokens(self) -> h5py.Dataset:
        """(N_train, N_query, T) BIF per query token (a per-token loss, bif.query_tokens)."""
        return self._bif("query_tokens", "it needs a per-token loss (B, T) and bif.query_tokens")

    @property
    def bif_loop_steps(self) -> h5py.Dataset:
        """(N_train, N_query, τ) BIF of each query's loss read out after every loop step."""
        return self._bif("loop_steps", "run with analysis.loop_trace set")

    @property
    def bif_token_pairs(self) -> h5py.Dataset:
        """(N_train, N_query, T, T) BIF of every (train token, query token) pair."""
        return self._bif("token_pairs", "run with bif.correlation=token and a per-token loss")

    def bif_topk_arrays(self, sign: Sign) -> tuple[np.ndarray, np.ndarray]:
        """All queries' stored BIF top-k: (indices, scores), each (M, k)."""
        indices = np.asarray(self._bif(f"topk/{sign}/indices", ""))
        return indices, np.asarray(self._bif(f"topk/{sign}/scores", ""))

    def llc(self) -> dict[str, np.ndarray]:
        """The local learning coefficient per checkpoint: ``per_chain`` (K, C), ``mean`` and
        ``std`` (K,), ``init_loss`` (K,) and the chains' minibatch losses ``step_losses``
        (K, C, steps) they are estimated from."""
        per_chain = np.asarray(self._bif("llc", ""))
        return {
            "per_chain": per_chain,
            "mean": per_chain.mean(axis=1),
            "std": per_chain.std(axis=1),
            "init_loss": np.asarray(self._bif("init_loss", "")),
            "step_losses": np.asarray(self._bif("step_losses", "")),
        }

    def bif_query_traces(self) -> np.ndarray:
        """(K, C, D, M): each query's loss at every draw of every chain (over positions)."""
        return np.asarray(self._bif("query_traces", ""))

    @property
    def has_sdi(self) -> bool:
        """Whether the full SDI tensor was kept (see merge.sdi_max_gb)."""
        return "sdi" in self._f

    @property
    def sdi(self) -> h5py.Dataset:
        """(N_train, N_query, slots) SDI, read lazily; absent when it was too large to keep."""
        if "sdi" not in self._f:
            raise RunDirError(
                f"{self.path} has no full SDI tensor (it exceeded merge.sdi_max_gb); top-k, "
                "TracIn and diagnostics are there. Rerun the merge with a larger limit to keep it."
            )
        return self._f["sdi"]  # type: ignore[return-value]

    @property
    def sdi_matrix(self) -> h5py.Dataset:
        """(N_train, N_query, train slots, query slots), if the merge wrote it."""
        if "sdi_matrix" not in self._f:
            raise RunDirError(f"{self.path} has no step matrix: merge with merge.step_matrix=true")
        return self._f["sdi_matrix"]  # type: ignore[return-value]

    @property
    def has_tokens(self) -> bool:
        """Whether the run kept per-token query features (analysis.query_tokens)."""
        return "token_positions" in self._f

    @property
    def has_sdi_tokens(self) -> bool:
        """Whether the full per-token SDI tensor was kept (see merge.sdi_max_gb)."""
        return "sdi_tokens" in self._f

    @property
    def token_positions(self) -> np.ndarray:
        """(N_query, P): the per-token loss positions of each query's chosen tokens."""
        self._need_tokens()
        return np.asarray(self._f["token_positions"])

    @property
    def sdi_tokens(self) -> h5py.Dataset:
        """(N_train, N_query, slots, P) SDI at each chosen query token, read lazily."""
        self._need_tokens()
        if "sdi_tokens" not in self._f:
            raise RunDirError(
                f"{self.path} has no full per-token SDI (it exceeded merge.sdi_max_gb); the "
                "per-token top-k and energy maps are there (token_map(query), topk(token=))"
            )
        return self._f["sdi_tokens"]  # type: ignore[return-value]

    def token_map(self, query: int, train: int | None = None) -> np.ndarray:
        """(slots, P) for one query: SDI of training example ``train`` at each (step, token),
        or with ``train=None`` the energy sum_i |SDI[i, query, step, token]|."""
        self._need_tokens()
        self._check_query(query)
        if train is None:
            return np.asarray(self._f["diagnostics/token_energy"][query])  # type: ignore[index]
        if not 0 <= train < self.n_train:
            raise ConfigError(f"train {train} out of range (0..{self.n_train - 1})")
        return np.asarray(self.sdi_tokens[train, query])

    def _need_tokens(self) -> None:
        if not self.has_tokens:
            raise ConfigError(
                f"{self.path} has no per-token SDI: run with analysis.query_tokens=last (or "
                "all, or positions) and a per-token loss"
            )

    def _check_query(self, query: int) -> None:
        if not 0 <= query < self.n_query:
            raise ConfigError(f"query {query} out of range (0..{self.n_query - 1})")

    def _slot(self, step: int | str | None) -> int | None:
        if step is None or isinstance(step, int):
            if isinstance(step, int) and not 0 <= step < len(self.slot_names):
                raise ConfigError(f"step {step} out of range: slots are {self.slot_names}")
            return step
        if step not in self.slot_names:
            raise ConfigError(f"no slot '{step}': slots are {self.slot_names}")
        return self.slot_names.index(step)

    def topk(
        self,
        query: int,
        k: int | None = None,
        step: int | str | None = None,
        sign: Sign = "positive",
        token: int | None = None,
        method: str = "sdi",
    ) -> list[tuple[int, float]]:
        """(train index, score) of the top-k training examples for ``query``.

        By TracIn when ``step`` is None, else by SDI at that slot (index or name such as
        ``"step 3"``); with ``token`` (index into the query's chosen tokens), by SDI at that
        slot and token. ``method="bif"`` ranks by BIF (no step or token).
        ``sign="negative"`` gives the most negative first.
        """
        if sign not in ("positive", "negative"):
            raise ConfigError(f"sign must be 'positive' or 'negative', got {sign!r}")
        if method not in ("sdi", "bif"):
            raise ConfigError(f"method must be 'sdi' or 'bif', got {method!r}")
        self._check_query(query)
        if method == "bif":
            if step is not None or token is not None:
                raise ConfigError("topk(method='bif') ranks by BIF: it takes no step or token")
            indices, values = self.bif_topk_arrays(sign)
            idx, scores = indices[query], values[query]
            if k is not None and k > len(idx):
                raise ConfigError(f"only the top {len(idx)} were kept (merge.topk); asked for {k}")
            return [(int(i), float(s)) for i, s in zip(idx[:k], scores[:k], strict=True)]
        slot = self._slot(step)
        if token is not None:
            n_tokens = self.token_positions.shape[1]
            if slot is None or not 0 <= token < n_tokens:
                raise ConfigError(
                    f"topk(token=...) needs a step and a token index in 0..{n_tokens - 1}"
                )
            indices, scores = self.topk_arrays("per_token", sign)
            idx, scores = indices[query, slot, token], scores[query, slot, token]
        else:
            indices, scores = self.topk_arrays("overall" if slot is None else "per_step", sign)
            idx, scores = indices[query], scores[query]
            if slot is not None:
                idx, scores = idx[slot], scores[slot]
        stored = len(idx)
        if k is not None and k > stored:
            raise ConfigError(f"only the top {stored} were kept (merge.topk); asked for {k}")
        return [(int(i), float(s)) for i, s in zip(idx[:k], scores[:k], strict=True)]

    def topk_arrays(self, scope: str, sign: Sign) -> tuple[np.ndarray, np.ndarray]:
        """All queries' stored top-k: (indices, scores), (M, k) for ``scope="overall"`` (by
        TracIn), (M, S, k) for ``"per_step"`` (by SDI per query slot) or (M, S, P, k) for
        ``"per_token"``."""
        group = self._f[f"topk/{scope}/{sign}"]
        assert isinstance(group, h5py.Group)
        return np.asarray(group["indices"]), np.asarray(group["scores"])

    def coverage(self) -> dict[str, int]:
        """How many units and training examples the merge combined."""
        return json.loads(str(self._f["diagnostics"].attrs["coverage"]))

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

    @property
    def has_loop_trace(self) -> bool:
        """Whether the run recorded the queries' loop dynamics (analysis.loop_trace)."""
        return "dynamics" in self._f

    @property
    def loop_slots(self) -> list[int]:
        """The indices of the loop-step slots among :attr:`slot_names` (no prelude/readout)."""
        return [s for s, name in enumerate(self.slot_names) if name.startswith("step ")]

    def loop_margins(self, checkpoint: int = -1) -> np.ndarray:
        """(N_query, loop steps): each query's logit margin after every loop step (the
        correct class's logit minus the other's) at one checkpoint (default: the last)."""
        return np.asarray(self._dynamics("margins")[self._checkpoint(checkpoint)])

    def loop_states(self, checkpoint: int = -1) -> np.ndarray:
        """(N_query, loop steps, d): each query's answer-token hidden state after every loop
        step at one checkpoint (default: the last)."""
        return np.asarray(self._dynamics("states")[self._checkpoint(checkpoint)])

    def phase_portrait(self, checkpoint: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """The answer-token states projected on their top-2 principal components.

        Returns (N_query, loop steps, 2) coordinates, PCA over all queries' states at all
        loop steps of one checkpoint, and the two components' explained variance ratios.
        Each component's sign is fixed (its largest loading is positive), so the same
        states give the same picture.
        """
        states = self.loop_states(checkpoint).astype(np.float64)
        points = states.reshape(-1, states.shape[-1])
        centred = points - points.mean(axis=0)
        _, singular, components = np.linalg.svd(centred, full_matrices=False)
        top = components[:2]
        signs = np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])
        top = top * signs[:, None]
        variance = singular**2
        explained = variance[:2] / max(float(variance.sum()), 1e-300)
        coords = (centred @ top.T).reshape(*states.shape[:2], len(top))
        return coords, explained

    def _dynamics(self, name: str) -> h5py.Dataset:
        if not self.has_loop_trace:
            raise ConfigError(
                f"{self.path} has no loop dynamics: run with analysis.loop_trace set (e.g. "
                "model=parity_dynamics)"
            )
        return self._f[f"dynamics/{name}"]  # type: ignore[return-value]

    def _checkpoint(self, checkpoint: int) -> int:
        n = len(self.checkpoints)
        if not -n <= checkpoint < n:
            raise ConfigError(f"checkpoint {checkpoint} out of range ({n} checkpoints)")
        return checkpoint % n

    def export(self, path: str | Path) -> Path:
        """Write a self-contained copy of these results to ``path`` and return it.

        results.h5 reads its per-example datasets (TracIn, SDI, ...) from the run's score
        shards; the copy holds them itself (Fletcher-32 checked, as read), so it can leave
        the run directory. Everything else is copied as it is.
        """
        dest = Path(path)
        if dest.exists() and dest.resolve() == self.path.resolve():
            raise ConfigError(f"export to another path than {self.path} itself")
        with atomic_path(dest) as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update(dict(self._f.attrs))

            def copy(name: str, obj: Any) -> None:
                if name.startswith("inputs/shard_"):
                    return  # the copy reads no shards
                if isinstance(obj, h5py.Group):
                    out.require_group(name).attrs.update(dict(obj.attrs))
                elif obj.is_virtual:
                    target = out.create_dataset(name, obj.shape, obj.dtype, chunks=True, **_CHECKED)
                    step = max(
                        1,
                        (64 * 2**20)
                        // max(1, obj.dtype.itemsize * obj.size // max(1, obj.shape[0])),
                    )
                    for start in range(0, obj.shape[0], step):
                        target[start : start + step] = obj[start : start + step]
                else:
                    self._f.copy(obj, out.require_group(str(Path(name).parent)), Path(name).name)

            self._f.visititems(copy)
        return dest

    def to_xarray(self, train: slice | None = None) -> Any:
        """The run as an ``xarray.Dataset`` with labelled dims (needs xarray installed).

        Variables: ``tracin`` (train, query); ``energy`` and ``signed_share`` (query, step);
        ``sdi`` (train, query, step) when the full SDI is stored; ``sdi_matrix`` (train,
        query, train_step, step) when the merge wrote it; per-token runs add
        ``token_energy`` (query, step, token) and, when stored, ``sdi_tokens`` (train,
        query, step, token). The ``step`` coordinate holds the slot names (``"step 1"``,
        ``"prelude"``, ...), ``token_position`` (query, token) each chosen token's position.
        Everything is read into memory: ``train`` (a slice) keeps only those rows.
        """
        xr = _optional_import("xarray", "to_xarray()")
        rows = slice(None) if train is None else train
        if not isinstance(rows, slice):
            raise ConfigError(f"train must be a slice of training rows, got {type(rows).__name__}")
        if self.method == "bif":
            return self._bif_xarray(xr, rows)
        data: dict[str, Any] = {
            "tracin": (("train", "query"), np.asarray(self.tracin[rows])),
            "energy": (("query", "step"), self.energy()),
            "signed_share": (("query", "step"), self.signed_share()),
        }
        coords: dict[str, Any] = {
            "train": np.arange(self.n_train)[rows],
            "query": np.arange(self.n_query),
            "step": list(self.slot_names),
        }
        if self.has_sdi:
            data["sdi"] = (("train", "query", "step"), np.asarray(self.sdi[rows]))
        if "sdi_matrix" in self._f:
            dims = ("train", "query", "train_step", "step")
            data["sdi_matrix"] = (dims, np.asarray(self.sdi_matrix[rows]))
            coords["train_step"] = list(self.train_slot_names)
        if self.has_tokens:
            positions = self.token_positions
            coords["token"] = np.arange(positions.shape[1])
            coords["token_position"] = (("query", "token"), positions)
            energy = np.asarray(self._f["diagnostics/token_energy"])
            data["token_energy"] = (("query", "step", "token"), energy)
            if self.has_sdi_tokens:
                dims = ("train", "query", "step", "token")
                data["sdi_tokens"] = (dims, np.asarray(self.sdi_tokens[rows]))
        if self.has_loop_trace:
            coords["checkpoint"] = np.arange(len(self.checkpoints))
            coords["loop_step"] = [self.slot_names[s] for s in self.loop_slots]
            dims = ("checkpoint", "query", "loop_step")
            data["loop_margins"] = (dims, np.asarray(self._dynamics("margins")))
            data["loop_states"] = ((*dims, "hidden"), np.asarray(self._dynamics("states")))
        attrs = {
            "config_hash": self.config_hash,
            "assignment": self.assignment,
            "etas": list(self.etas),
            "checkpoints": list(self.checkpoints),
        }
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def _bif_xarray(self, xr: Any, rows: slice) -> Any:
        """A BIF run's Dataset: ``bif`` (train, query), ``bif_checkpoints`` (train,
        checkpoint, query), the views it kept (``bif_query_tokens`` (…, token),
        ``bif_loop_steps`` (…, loop_step), ``bif_token_pairs`` (…, train_token, token)) and
        ``llc`` (checkpoint, chain)."""
        group = self._f["bif"]
        assert isinstance(group, h5py.Group)
        data: dict[str, Any] = {
            "bif": (("train", "query"), np.asarray(self.bif[rows])),
            "bif_checkpoints": (
                ("train", "checkpoint", "query"),
                np.asarray(self.bif_checkpoints[rows]),
            ),
            "llc": (("checkpoint", "chain"), np.asarray(group["llc"])),
        }
        views = {
            "query_tokens": ("train", "query", "token"),
            "loop_steps": ("train", "query", "loop_step"),
            "token_pairs": ("train", "query", "train_token", "token"),
        }
        for name, dims in views.items():
            if name in group:
                data[f"bif_{name}"] = (dims, np.asarray(group[name][rows]))  # type: ignore[index]
        coords = {
            "train": np.arange(self.n_train)[rows],
            "query": np.arange(self.n_query),
            "checkpoint": np.arange(len(self.checkpoints)),
        }
        attrs = {"config_hash": self.config_hash, "method": "bif", "etas": list(self.etas),
                 "checkpoints": list(self.checkpoints)}  # fmt: skip
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def topk_frame(self, scope: str = "overall", sign: Sign = "positive") -> Any:
        """The stored top-k of every query as a pandas DataFrame (needs pandas installed).

        One row per (query, slot, token, rank) with columns ``query``, ``slot``, ``token``,
        ``position``, ``rank`` (1 = the strongest), ``train_index`` and ``score``.
        ``scope`` is ``"overall"`` (by TracIn; ``slot`` is ``"overall"``), ``"per_step"`` (by
        SDI at each slot) or ``"per_token"`` (by SDI at each slot and chosen query token:
        ``token`` indexes the query's chosen tokens, ``position`` is where that token is);
        ``token`` and ``position`` are missing (``<NA>``) outside ``"per_token"``.
        """
        pd = _optional_import("pandas", "topk_frame()")
        if scope not in TOPK_SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(TOPK_SCOPES)}, got {scope!r}")
        if sign not in ("positive", "negative"):
            raise ConfigError(f"sign must be 'positive' or 'negative', got {sign!r}")
        if scope == "per_token":
            self._need_tokens()
        indices, scores = self.topk_arrays(scope, sign)
        # Bring every scope to (M, S, P, k): overall has one pseudo-slot, only per_token P > 1.
        if scope == "overall":
            indices, scores = indices[:, None, None], scores[:, None, None]
            slots = ["overall"]
        elif scope == "per_step":
            indices, scores = indices[:, :, None], scores[:, :, None]
            slots = list(self.slot_names)
        else:
            slots = list(self.slot_names)
        n_query, n_slots, n_tokens, k = indices.shape
        query, slot, token, rank = np.meshgrid(
            np.arange(n_query), np.arange(n_slots), np.arange(n_tokens), np.arange(k),
            indexing="ij",
        )  # fmt: skip
        if scope == "per_token":
            token_col = token.ravel()
            position_col = self.token_positions[query.ravel(), token_col]
        else:  # no token: nullable integers, all missing
            token_col = position_col = np.full(query.size, None, dtype=object)
        return pd.DataFrame(
            {
                "query": query.ravel(),
                "slot": np.asarray(slots, dtype=object)[slot.ravel()],
                "token": pd.array(token_col, dtype="Int64"),
                "position": pd.array(position_col, dtype="Int64"),
                "rank": rank.ravel() + 1,
                "train_index": indices.ravel().astype(np.int64),
                "score": scores.ravel().astype(np.float64),
            }
        )


def _optional_import(name: str, what: str) -> Any:
    """Import a package the notebook helpers need but the pipeline does not."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"{what} needs {name}: pip install {name}") from err


class ResultsWriter:
    """Fills an open results file; made by :func:`write_results`."""

    def __init__(self, f: h5py.File, n_query: int, s_q: int, s_tr: int) -> None:
        self._f = f
        self.n_query, self.s_q, self.s_tr = n_query, s_q, s_tr

    def stitch(
        self,
        name: str,
        source: str,
        shape: tuple[int, ...],
        axis: int,
        sources: Sequence[tuple[str, int, int]],
    ) -> None:
        """Dataset ``name`` of ``shape`` as an HDF5 virtual dataset: the rows ``start:stop``
        along ``axis`` of each ``(file, start, stop)`` are that file's dataset ``source``
        (file paths relative to results.h5). Nothing is copied; what no file covers reads as
        NaN, and a missing file is caught by :meth:`Results.open` (``inputs/shard_*``)."""
        layout = h5py.VirtualLayout(shape=shape, dtype="f4")
        for path, start, stop in sources:
            part = list(shape)
            part[axis] = stop - start
            index = tuple(
                slice(start, stop) if a == axis else slice(None) for a in range(len(shape))
            )
            layout[index] = h5py.VirtualSource(path, source, shape=tuple(part))
        self._f.create_virtual_dataset(name, layout, fillvalue=np.nan)

    def write_token_positions(self, positions: np.ndarray) -> None:
        """The chosen query tokens of per-token runs: their positions (M, P)."""
        _checked(self._f, "token_positions", positions)

    def write_dynamics(self, states: np.ndarray, margins: np.ndarray) -> None:
        """The queries' loop dynamics at every checkpoint: answer-token states (K, M, τ, d)
        and logit margins (K, M, τ)."""
        group = self._f.require_group("dynamics")
        group.create_dataset("states", data=states.astype(np.float32))
        group.create_dataset("margins", data=margins.astype(np.float32))

    def write_topk(self, scope: str, sign: str, indices: np.ndarray, scores: np.ndarray) -> None:
        group = self._f.require_group(f"topk/{scope}/{sign}")
        _checked(group, "indices", indices)
        _checked(group, "scores", scores)

    def write_diagnostics(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``diagnostics/<name>`` datasets (energy, signed_share, sketch norms, losses)."""
        diag = self._f.require_group("diagnostics")
        for name, values in arrays.items():
            _checked(diag, name, values)

    def write_units(self, names: Sequence[str], stats: Sequence[Mapping[str, Any]]) -> None:
        """The per-unit table (names and :data:`UNIT_STATS`) and the coverage attribute."""
        group = self._f.require_group("diagnostics/units")
        _checked(group, "name", np.array(list(names), dtype="S"))
        for key in UNIT_STATS:
            _checked(group, key, np.array([s.get(key, np.nan) for s in stats], "f8"))
        self._f["diagnostics"].attrs["coverage"] = json.dumps(
            {"units": len(names), "examples": int(sum(s.get("examples", 0) for s in stats))}
        )

    def write_bif(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``bif/<name>`` datasets that are not stitched from shards: the stored top-k
        (``topk/<sign>/...``), the LLC and the chains' traces."""
        group = self._f.require_group("bif")
        for name, values in arrays.items():
            _checked(group, name, values)

    def write_inputs(
        self,
        *,
        config_hash: str,
        units: Mapping[str, str],
        shards: Mapping[str, str],
        query: Sequence[str],
        checkpoints: Sequence[str],
        checkpoint_sha256: Sequence[str],
        data_files: Mapping[str, Any],
        bif_query: Sequence[str] = (),
    ) -> None:
        """What the results are made from: each unit's, score shard's and query file's content
        digest, the checkpoints and their sha256, the data files' identities
        (:func:`~sdi_pipeline.run.freshness.record_data_files`): how :meth:`Results.open`
        tells a stale file."""
        group = self._f.require_group("inputs")
        group.attrs["config_hash"] = config_hash
        group.attrs["data_files"] = json.dumps(dict(data_files))
        names = sorted(units)
        blocks = sorted(shards)
        for name, values in (
            ("unit_names", names),
            ("unit_digests", [units[n] for n in names]),
            ("shard_names", blocks),
            ("shard_digests", [shards[b] for b in blocks]),
            ("query_digests", list(query)),
            ("bif_query_digests", list(bif_query)),
            ("checkpoint_paths", list(checkpoints)),
            ("checkpoint_sha256", list(checkpoint_sha256)),
        ):
            _checked(group, name, np.array([v.encode() for v in values], dtype="S"))


def _checked(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A dataset with a Fletcher-32 checksum (chunked, as HDF5 filters need)."""
    array = np.asarray(data)
    if array.size == 0:  # a chunk cannot be empty; nothing to checksum either
        return group.create_dataset(name, data=array)
    return group.create_dataset(name, data=array, chunks=True, **_CHECKED)


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to start writing ``path`` when its disk lacks ``needed`` bytes.

    HDF5 cannot recover from a full disk in the middle of a write, so results.h5 is sized
    first: one clear error rather than a crash.
    """
    folder = path.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise RunDirError(
            f"cannot write {path}: it needs about {_size(needed)} but only {_size(free)} are "
            f"free in {folder} (no space left on the device): free space there, then run the "
            "same command again"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


@contextmanager
def write_results(
    path: Path,
    *,
    n_query: int,
    query_layout: Mapping[str, Any],
    train_layout: Mapping[str, Any],
    slot_names: Sequence[str],
    train_slot_names: Sequence[str],
    attrs: Mapping[str, Any],
) -> Iterator[ResultsWriter]:
    """Write results.h5 at ``path``: under a temporary name, renamed when the block ends.

    ``attrs`` are the scalar attributes (config_hash, n_train, sdi_stored, train_steps,
    topk); ``etas`` and ``checkpoints`` among them are stored as JSON.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        writer = ResultsWriter(f, n_query, len(slot_names), len(train_slot_names))
        yield writer
        f.attrs["format"] = RESULTS_FORMAT
        f.attrs["format_version"] = RESULTS_VERSION
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if key in ("etas", "checkpoints") else value
        f.attrs["n_query"] = n_query
        f.attrs["query_layout"] = json.dumps(dict(query_layout))
        f.attrs["train_layout"] = json.dumps(dict(train_layout))
        f.attrs["slot_names"] = json.dumps(list(slot_names))
        f.attrs["train_slot_names"] = json.dumps(list(train_slot_names))
