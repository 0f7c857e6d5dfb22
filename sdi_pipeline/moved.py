"""Module paths of sdi-pipeline 0.1 that moved in the stage-folder layout: the one list.

Old paths keep working for one release: ``import sdi_pipeline.results`` (or a Hydra
``_target_: sdi_pipeline.losses.next_token_loss``) gives the module at its new home, the
same module object, so ``isinstance`` checks and monkeypatching see one class. New code
and configs use the new paths (README, ``conf/``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

#: Old module path -> new module path.
MOVED_MODULES: dict[str, str] = {
    "sdi_pipeline.atomic": "sdi_pipeline.files.atomic",
    "sdi_pipeline.digests": "sdi_pipeline.files.digests",
    "sdi_pipeline.data": "sdi_pipeline.inputs.data",
    "sdi_pipeline.losses": "sdi_pipeline.inputs.losses",
    "sdi_pipeline.checkpoints": "sdi_pipeline.inputs.checkpoints",
    "sdi_pipeline.content": "sdi_pipeline.inputs.content",
    "sdi_pipeline.dynamics": "sdi_pipeline.inputs.dynamics",
    "sdi_pipeline.build": "sdi_pipeline.inputs.build",
    "sdi_pipeline.layout": "sdi_pipeline.run.layout",
    "sdi_pipeline.rundir": "sdi_pipeline.run.rundir",
    "sdi_pipeline.config": "sdi_pipeline.run.config",
    "sdi_pipeline.leases": "sdi_pipeline.run.leases",
    "sdi_pipeline.freshness": "sdi_pipeline.run.freshness",
    "sdi_pipeline.store": "sdi_pipeline.formats.sketches",
    "sdi_pipeline.shards": "sdi_pipeline.formats.shards",
    "sdi_pipeline.results": "sdi_pipeline.formats.results",
    "sdi_pipeline.summary": "sdi_pipeline.report.summary",
    "sdi_pipeline.plots": "sdi_pipeline.report.plots",
    "sdi_pipeline.wandb_log": "sdi_pipeline.report.wandb_log",
    "sdi_pipeline.merge": "sdi_pipeline.jobs.merge",
    "sdi_pipeline.scoring": "sdi_pipeline.jobs.scoring",
    "sdi_pipeline.scores": "sdi_pipeline.jobs.scores",
    "sdi_pipeline.logs": "sdi_pipeline.jobs.logs",
    "sdi_pipeline.attribute_cli": "sdi_pipeline.launch.attribute_cli",
    "sdi_pipeline.cli": "sdi_pipeline.launch.cli",
    "sdi_pipeline.compose": "sdi_pipeline.launch.compose",
    "sdi_pipeline.status": "sdi_pipeline.launch.status",
    "sdi_pipeline.launchers": "sdi_pipeline.launch",
    "sdi_pipeline.launchers.local": "sdi_pipeline.launch.local",
    "sdi_pipeline.launchers.slurm": "sdi_pipeline.launch.slurm",
    "sdi_pipeline.launchers.prepare": "sdi_pipeline.launch.prepare",
    "sdi_pipeline.featurize": "sdi_pipeline.engine.featurizer",
    "sdi_pipeline.sketch": "sdi_pipeline.engine",
    "sdi_pipeline.sketch.spec": "sdi_pipeline.engine.spec",
}

#: Names the old ``sdi_pipeline.jobs`` module held -> their module now (``jobs`` is a package).
MOVED_JOB_NAMES: dict[str, str] = {
    "run_worker": "sdi_pipeline.jobs.worker",
    "run_score": "sdi_pipeline.jobs.score",
    "run_query": "sdi_pipeline.jobs.query",
    "query_fresh": "sdi_pipeline.jobs.context",
    "JobContext": "sdi_pipeline.jobs.context",
    "EXIT_INTERRUPTED": "sdi_pipeline.jobs.context",
    "Interrupted": "sdi_pipeline.jobs.context",
}


#: Names the old ``sdi_pipeline.launchers`` package held -> their module now.
MOVED_LAUNCHER_NAMES: dict[str, str] = {
    "LAUNCHERS": "sdi_pipeline.launch.launchers",
    "Launcher": "sdi_pipeline.launch.launchers",
    "allocated_cpus": "sdi_pipeline.jobs.allocation",
    "array_task_count": "sdi_pipeline.jobs.allocation",
    "array_task_id": "sdi_pipeline.jobs.allocation",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module is the new home's, already executed. The import system has set its
        # __spec__ to the alias's: give it back its own (pickling, reload and -m use it).
        module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=False)


def install() -> None:
    """Make the old module paths importable (once per process)."""
    # First in line: an old path under a moved package (sdi_pipeline.sketch.spec) must not
    # be found by the path finder as a second copy of the new module.
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def _moved_name(package: str, table: dict[str, str], name: str) -> Any:
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(table[name]), name)


def moved_job_name(name: str) -> Any:
    """An attribute of the old ``sdi_pipeline.jobs`` module, from its new home."""
    return _moved_name("sdi_pipeline.jobs", MOVED_JOB_NAMES, name)


def moved_launcher_name(name: str) -> Any:
    """An attribute of the old ``sdi_pipeline.launchers`` package, from its new home."""
    return _moved_name("sdi_pipeline.launch", MOVED_LAUNCHER_NAMES, name)
