"""The package's shape: no import cycles, light results reading, public API importable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdi_pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """sdi_pipeline modules imported when ``path`` is imported (not in functions or
    TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def test_no_import_cycles() -> None:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _top_level_imports(path, set(files)) - {name} for name, path in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


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
    from sdi_pipeline.checkpoints import CheckpointSpec
    from sdi_pipeline.featurize import StepFeaturizer
    from sdi_pipeline.results import Results
    from sdi_pipeline.sketch.spec import SketchSpec

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


def test_only_the_slurm_launcher_knows_slurm_commands() -> None:
    words = ("sbatch", "sacct", "squeue", "scontrol", "SLURM_")
    found = [
        f"{path.relative_to(PACKAGE)}: {word}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "slurm.py"
        for word in words
        if word in path.read_text()
    ]
    assert found == []
