"""The options everyone sets, for ``sdi-attribute --help`` and the README (a test keeps the
README's copy equal to :func:`common_options`).

Written from the config schema (each field's ``help`` metadata and default) and the
config groups in ``conf/``, so that a new option or group shows up here without editing.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from sdi_pipeline.launch.compose import conf_dir
from sdi_pipeline.run.config import AnalysisConfig, CheckpointsConfig, RunConfig, SketchConfig
from sdi_pipeline.run.launcher_configs import LocalLauncherConfig

WIDTH = 92  # characters per line, as the README's text blocks
# (key, schema class, field name) of the options everyone sets, in the order they are listed.
FIELDS = (
    ("checkpoints.paths", CheckpointsConfig, "paths"),
    ("checkpoints.etas", CheckpointsConfig, "etas"),
    ("analysis.targets", AnalysisConfig, "targets"),
    ("sketch.m", SketchConfig, "m"),
    ("launcher.workers", LocalLauncherConfig, "workers"),
    ("run.name", RunConfig, "name"),
)


def _groups(group: str) -> str:
    options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    return ", ".join(options)


def _default(schema: type, name: str) -> Any:
    (field,) = [f for f in dataclasses.fields(schema) if f.name == name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def common_options() -> str:
    """The options everyone sets, one per line: ``key=VALUE`` (default) and what it does."""
    rows = [
        ("model=NAME", f"the model group: {_groups('model')} (default toy), or one in "
                       "--config-dir; model._target_=pkg.factory for a factory alone"),
        ("data=tokens", f"token arrays as train and query data (groups: {_groups('data')})"),
        ("data.train.path=FILE", "training sequences (.npy, .pt, .h5, jsonl, save_to_disk)"),
        ("data.query.path=FILE", "the queries, in the same formats"),
        ("checkpoints=files", f"your own checkpoint files (groups: {_groups('checkpoints')})"),
        ("method=NAME", "sdi (default): per-loop-step TracIn; bif: the Bayesian influence "
                        "function from SGLD loss traces (bif.* keys, README 'BIF')"),
    ]  # fmt: skip
    for key, schema, name in FIELDS:
        if key == "launcher.workers":
            where = f"where the jobs run: {_groups('launcher')} (default local)"
            rows.append(("launcher=NAME", where))
        (field,) = [f for f in dataclasses.fields(schema) if f.name == name]
        rows.append((f"{key}=... ({_show(_default(schema, name))})", field.metadata["help"]))
    width = max(len(key) for key, _ in rows) + 4
    lines = []
    for key, text in rows:
        wrapped = textwrap.wrap(text, WIDTH - width)
        lines.append(f"  {key:<{width - 2}}{wrapped[0]}")
        lines += [" " * width + more for more in wrapped[1:]]
    return "\n".join(lines)
