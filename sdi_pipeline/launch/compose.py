"""Compose the attribution config from conf/ with Hydra, with errors a user can act on.

The schemas (:mod:`sdi_pipeline.run.config`) are registered in Hydra's ConfigStore, so an
unknown key or a wrong type fails at composition, before anything is submitted. Where the
loss came from (:func:`loss_origin`) is found by composing again without config groups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sdi_pipeline.errors import ConfigError
from sdi_pipeline.launch.launchers import LAUNCHERS
from sdi_pipeline.messages import did_you_mean
from sdi_pipeline.run.config import AttributionConfig, explain, structured

GROUPS = ("model", "data", "checkpoints", "sketch", "launcher", "wandb")


def conf_dir() -> Path:
    """The package's conf/ (next to the package in a checkout or editable install)."""
    env = os.environ.get("SDI_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"cannot find sdi-pipeline's conf/ at {path}: install the package from a checkout "
            "(pip install -e .) or point SDI_CONF_DIR at a copy of conf/"
        )
    return path


def register_schemas() -> None:
    """Store the config schemas in Hydra's ConfigStore (``conf/`` names them as defaults).

    ``conf/launcher/<name>.yaml`` builds on ``<name>_schema``, one per launcher.
    """
    cs = ConfigStore.instance()
    cs.store(name="attribution_schema", node=AttributionConfig)
    for launcher in LAUNCHERS.values():
        cs.store(group="launcher", name=f"{launcher.name}_schema", node=launcher.schema)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _hint(message: str) -> str:
    """Add valid choices to Hydra's terse composition errors about config groups."""
    for group in GROUPS:
        if f"'{group}'" in message or f"{group}/" in message:
            return (
                f"{message.splitlines()[0]} Available {group} options: {', '.join(_options(group))}"
            )
    return message.splitlines()[0]


def _unknown_key(key: str, overrides: Sequence[str], config_dirs: Sequence[str]) -> str | None:
    """Hydra's "Could not override 'a.b'" as the valid keys of ``a``, read from the config
    composed without that override: so a launcher's keys are those of the launcher chosen
    (``launcher=slurm`` lists SLURM's), and a user group's keys are its own."""
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        composed = _compose(rest, config_dirs)
    except (HydraException, OmegaConfBaseException):
        return None  # another override fails too: Hydra's own message names the first
    # The deepest section that exists: in 'foo.bar' it is the top level, 'foo' the typo.
    parts = key.split(".")
    depth = len(parts) - 1
    while depth and not isinstance(OmegaConf.select(composed, ".".join(parts[:depth])), DictConfig):
        depth -= 1
    parent_path, name = ".".join(parts[:depth]), parts[depth]
    parent = OmegaConf.select(composed, parent_path) if parent_path else composed
    if not isinstance(parent, DictConfig):
        return None
    valid = [str(k) for k in parent if str(k) != "hydra"]
    where = f"of {parent_path}" if parent_path else "at the top level"
    hint = did_you_mean(name, valid)
    return f"unknown config key '{key}'.{hint} Valid keys {where}: {', '.join(valid)}"


def _compose(
    overrides: Sequence[str], config_dirs: Sequence[str], with_hydra: bool = False
) -> DictConfig:
    """Hydra's composition of conf/config.yaml (``with_hydra``: keep its ``hydra`` node)."""
    register_schemas()
    extra = list(overrides)
    if config_dirs:
        paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
        extra.append(f"hydra.searchpath=[{paths}]")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=extra, return_hydra_config=with_hydra)


def python_path(config_dirs: Sequence[str], given: Sequence[str] = ()) -> list[str]:
    """``given``, then the working directory and each config dir (absolute, each once).

    Users expect a factory in ``./mymodels.py`` or next to their configs to import, as
    with ``python -m``; the jobs put these folders on ``sys.path`` too.
    """
    paths = [*map(str, given), os.getcwd(), *(str(Path(d).resolve()) for d in config_dirs)]
    return list(dict.fromkeys(paths))


def compose_config(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with ``overrides``; ``config_dirs`` add users' own groups.

    ``runtime.python_path`` gets the working directory and the config dirs (see
    :func:`python_path`).
    """
    try:
        cfg = _compose(overrides, config_dirs, with_hydra=True)
    except (HydraException, OmegaConfBaseException) as err:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            raise ConfigError(explain(err, OmegaConf.structured(AttributionConfig))) from err
        quoted = str(err).split("'")
        if str(err).startswith("Could not override") and len(quoted) > 1:
            known = _unknown_key(quoted[1], overrides, config_dirs)
            if known is not None:
                raise ConfigError(known) from err
        raise ConfigError(_hint(str(err))) from err
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        del cfg["hydra"]
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config values still missing (???): {', '.join(missing)}")
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    data.setdefault("run", {})["name"] = run_name(overrides, choices.get("model"), data)
    result = structured(data)
    result.runtime.python_path = python_path(config_dirs, result.runtime.python_path)
    return result


def run_name(overrides: Sequence[str], group: str | None, data: dict[Any, Any]) -> str:
    """``run.name`` of a composed config (``data``), so that runs of different models do not
    share a folder: ``run.name`` given on the command line; else, when the command line names
    the model's factory (``model._target_=pkg.build_lm``), the factory's name (runs/build_lm/);
    else the name a config group sets (the toy's ``toy-parity``); else the model group's name
    (``model=mylm``: runs/mylm/)."""
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}
    given = (data.get("run") or {}).get("name")
    target = (data.get("model") or {}).get("_target_")
    if "run.name" not in keys and "model._target_" in keys and isinstance(target, str):
        return target.rpartition(".")[2]
    if given is not None:
        return str(given)
    return (group or "run").replace("/", "-")


def _loss_node(cfg: DictConfig) -> Any:
    """``analysis.loss`` as plain data, interpolations unresolved (for comparing)."""
    node = OmegaConf.select(cfg, "analysis.loss")
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node


def loss_origin(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> str:
    """Where the composed ``analysis.loss`` comes from, for telling the user.

    ``the command line`` when an override sets it; else the config group whose option set
    it, as ``group=option`` (e.g. ``model=mylm``, or ``data=tokens`` for a data group's
    default); else ``the root config``. A group is found by composing again without it:
    groups are taken away one by one (the data group first: its loss is only a default;
    then the model group) and the first whose removal changes the loss set it.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for o in parsed:
        key = o.key_or_group
        if key in ("analysis", "analysis.loss") or key.startswith("analysis.loss."):
            return "the command line"
    base = _compose(overrides, config_dirs, with_hydra=True)
    choices = {
        str(group): str(option)
        for group, option in base.hydra.runtime.choices.items()
        if "/" not in str(group) and option is not None
    }
    # Value overrides do not set the loss (checked above): keep only the group choices.
    kept = [o for o in parsed if o.key_or_group in choices]
    loss = _loss_node(base)
    # A group added on the command line (+group=option) is removed by dropping that
    # override; one from conf/config.yaml's defaults by deleting it (~group).
    added = {o.key_or_group for o in kept if o.is_add()}
    removed: list[str] = []
    for group in sorted(choices, key=lambda g: {"data": 0, "model": 1}.get(g, 2)):
        removed.append(group)
        rest = [str(o.input_line) for o in kept if o.key_or_group not in removed]
        deleted = [f"~{g}" for g in removed if g not in added]
        try:
            without = _compose([*rest, *deleted], config_dirs)
        except (HydraException, OmegaConfBaseException):
            return "the config groups"  # a group others depend on: the origin is unknown
        if _loss_node(without) != loss:
            return f"{group}={choices[group]}"
    return "the root config"


def describe_loss(node: Any) -> str:
    """A loss node in one line: its ``_target_`` and arguments, e.g. ``pkg.fn(ignore_index=0)``."""
    data = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    if not isinstance(data, dict) or "_target_" not in data:
        return str(data)
    args = ", ".join(f"{k}={v}" for k, v in data.items() if not str(k).startswith("_"))
    return f"{data['_target_']}({args})" if args else str(data["_target_"])
