"""The native CPU kernel of the dense Linear-weight sketch: built once per host, optional.

``dense_sketch.cpp`` (beside this file) computes what ``torch.bmm`` + ``index_add_`` compute
in :func:`~sdi_pipeline.engine.kernels.linear_weight_dense` in one pass, without writing the
per-example gradients to memory (see docs/benchmarks.md for what it gains). It is compiled
with the host's C++ compiler through ``torch.utils.cpp_extension`` the first time a process
needs it (about 30 s on 2 cores) and cached as a shared library under the cache folder
(``$SDI_PIPELINE_CACHE_DIR``, else ``~/.cache/sdi-pipeline``), keyed by the source, torch
version, compiler, flags and CPU, so later processes only load it; a failed build is
recorded there too and not tried again. Each build runs in a private temporary folder and
the library is renamed into place when complete: processes building at once, or one killed
mid-build, never leave a lock or a partial library behind.

Where it cannot be built (no C++ compiler or ninja, an unsupported platform) or
``SDI_PIPELINE_NATIVE=0`` is set, the stock PyTorch kernel runs instead, with one log line
saying why: the same linear map, so sketches differ by float rounding at most.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sdi_pipeline.engine.host_cache import cache_dir
from sdi_pipeline.errors import SDIError
from sdi_pipeline.files.atomic import write_json_atomic

log = logging.getLogger(__name__)

#: ``0`` (or ``off``/``false``/``no``) turns the native kernel off.
NATIVE_ENV = "SDI_PIPELINE_NATIVE"
SOURCE = Path(__file__).with_name("dense_sketch.cpp")
_OFF = {"0", "off", "false", "no"}

DenseSketchOp = Callable[..., None]
# This process's answer: unset until asked, then the op or the reason there is none.
_state: dict[str, DenseSketchOp | str] = {}


def _flags() -> list[str]:
    # -march=native is safe because the cache key holds the CPU's feature flags.
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    return ["-O3", *arch, "-fopenmp"]


def _cpu_identity() -> str:
    """The CPU model and feature flags (a library built for one CPU may not run on another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension builds with


def library_path(cache: Path) -> Path:
    """Where the library for this source, torch version, compiler, flags and CPU is cached."""
    key = hashlib.sha256()
    parts = (SOURCE.read_text(), torch.__version__, _compiler(), " ".join(_flags()))
    for part in parts:
        key.update(part.encode() + b"\0")
    key.update(f"{platform.machine()}\0{_cpu_identity()}\0{sys.platform}".encode())
    return cache / "native" / f"dense-sketch-{key.hexdigest()[:20]}.so"


def _unavailable() -> str | None:
    """Why the kernel cannot be built here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if os.environ.get(NATIVE_ENV, "").strip().lower() in _OFF:
        return f"{NATIVE_ENV}={os.environ[NATIVE_ENV]}"
    if not sys.platform.startswith("linux"):
        return f"it is built on Linux only (this is {sys.platform})"
    compiler = _compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ('{compiler}' is not on PATH; set CXX or install g++)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build(path: Path) -> None:
    """Compile the library in a private folder, load it, then rename it into ``path``."""
    from torch.utils.cpp_extension import load_inline

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob("build-*"):  # of builds killed an hour ago or more
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=path.parent))
    try:
        name = path.stem.replace("-", "_")
        log.info("compiling the native CPU sketch kernel (once per host, about 30 s on 2 cores)")
        started = time.perf_counter()
        load_inline(
            name,
            cpp_sources=[SOURCE.read_text()],
            extra_cflags=_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(work),
            is_python_module=False,
            verbose=False,
        )
        os.replace(work / f"{name}.so", path)
        log.info(
            "native CPU sketch kernel built in %.0f s: %s", time.perf_counter() - started, path
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load() -> DenseSketchOp | str:
    why = _unavailable()
    if why is not None:
        return why
    path = library_path(cache_dir())
    failed = path.with_suffix(".failed.json")
    if failed.exists():
        return f"its build failed on this host before (delete {failed} to try again)"
    try:
        if path.exists():
            try:
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError) as err:
                log.warning("cannot load %s (%s): building it again", path, err)
                path.unlink(missing_ok=True)
                _build(path)
        else:
            _build(path)
    except Exception as err:  # a failed build only costs speed: say why and carry on
        # Recorded, so that later processes do not spend the build's time again.
        with contextlib.suppress(OSError, SDIError):
            write_json_atomic(failed, {"error": f"{type(err).__name__}: {err}"})
        return f"building it failed ({type(err).__name__}; the compiler's output is in {failed})"
    return torch.ops.sdi_pipeline.dense_sketch_add


def dense_sketch_op() -> DenseSketchOp | None:
    """The native dense-sketch op, built or loaded on first use; None where it is not
    available (logged once per process, with the reason)."""
    if "op" not in _state:
        found = _load()
        _state["op"] = found
        if isinstance(found, str):
            log.info("native CPU sketch kernel not used: %s; the stock PyTorch kernel runs", found)
    op = _state["op"]
    return None if isinstance(op, str) else op
