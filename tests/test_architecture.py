"""The package's shape: no import cycles, light results reading, public API importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdi_pipeline"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the package under ``root`` with this repository's contracts."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(PACKAGE.parent / "pyproject.toml"), "--no-cache"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
    )  # fmt: skip


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    shutil.copytree(
        PACKAGE, tmp_path / "sdi_pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "sdi_pipeline" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


def test_the_layers_hold() -> None:
    proc = _lint_imports(PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # A file format importing a job: a lower layer importing a higher one.
        ("formats/shards.py", "from sdi_pipeline.jobs import scores", "Stage folders are layers"),
        ("engine/spec.py", "import sdi_pipeline.inputs.losses", "engine imports nothing above"),
        ("run/layout.py", "import sdi_pipeline.attribute", "the in-process API"),
        # Two modules of one folder importing each other (rundir imports layout).
        ("run/layout.py", "import sdi_pipeline.run.rundir", "no import circle"),
    ],
)
def test_a_wrong_import_fails_lint_imports(tmp_path, module: str, line: str, contract: str) -> None:
    proc = _lint_imports(_copy_with(tmp_path, module, line))
    assert proc.returncode != 0
    assert contract in proc.stdout and "BROKEN" in proc.stdout, proc.stdout


def test_old_module_paths_give_the_modules_at_their_new_homes() -> None:
    code = (
        "import importlib, sdi_pipeline.moved as m\n"
        "for old, new in m.MOVED_MODULES.items():\n"
        "    a, b = importlib.import_module(old), importlib.import_module(new)\n"
        "    assert a is b and a.__spec__.name == new, (old, new)\n"
        "from sdi_pipeline.jobs import run_worker, run_query, run_score, EXIT_INTERRUPTED\n"
        "from sdi_pipeline.launchers import LAUNCHERS, allocated_cpus\n"
        "from sdi_pipeline.sketch.spec import SketchSpec\n"
        "from sdi_pipeline.engine.spec import SketchSpec as New\n"
        "assert SketchSpec is New\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_launcher_has_a_schema_and_every_schema_a_launcher() -> None:
    from sdi_pipeline.launch.launchers import LAUNCHERS
    from sdi_pipeline.run.launcher_configs import LAUNCHER_SCHEMAS

    assert list(LAUNCHERS) == list(LAUNCHER_SCHEMAS)


def test_results_import_without_torch_hydra_or_the_engine() -> None:
    code = (
        "import sys; from sdi_pipeline import Results; "
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'hydra', 'omegaconf', 'opacus') or m.startswith('sdi_pipeline.engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_importable_from_the_top_level_and_the_old_paths() -> None:
    import sdi_pipeline
    from sdi_pipeline.attribute import attribute
    from sdi_pipeline.engine.featurizer import StepFeaturizer
    from sdi_pipeline.engine.spec import SketchSpec
    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.inputs.checkpoints import CheckpointSpec

    # The function and its module share a name: whichever the package attribute holds, it
    # is the function or calls it.
    assert callable(sdi_pipeline.attribute) and callable(attribute)
    assert sdi_pipeline.CheckpointSpec is CheckpointSpec
    assert sdi_pipeline.StepFeaturizer is StepFeaturizer
    assert sdi_pipeline.SketchSpec is SketchSpec
    assert sdi_pipeline.Results is Results
    assert set(sdi_pipeline.__all__) >= {
        "attribute",
        "CheckpointSpec",
        "StepFeaturizer",
        "SketchSpec",
        "Results",
    }


def test_only_the_slurm_modules_know_slurm() -> None:
    # The launcher, its config schema and the job's view of its allocation.
    slurm = {"launch/slurm.py", "run/launcher_configs.py", "jobs/allocation.py"}
    words = ("sbatch", "sacct", "squeue", "scontrol", "SLURM_")
    found = [
        f"{path.relative_to(PACKAGE)}: {word}"
        for path in PACKAGE.rglob("*.py")
        if str(path.relative_to(PACKAGE)) not in slurm
        for word in words
        if word in path.read_text()
    ]
    assert found == []
