"""Configs are data: omegaconf structured defaults (dataclasses), YAML files with ``_base_``
inheritance, and ``key=value`` overrides from the command line.

Every key is checked against the dataclass schema *before* anything is merged, so a typo fails at
once, naming the file, the key and the closest valid key, instead of hours into a run. A key the schema
has moved (its ``MOVED_KEYS``, old dotted name -> new) is read at its new place with a warning, so
older configs and run folders keep loading.
"""
from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError  # noqa: F401  (raised here; importers take it from here too)

BASE_KEY = "_base_"


@dataclass
class RunConfig:
    """Run-level keys every training config has (subclasses add model/data/solver/eval first)."""

    output_dir: str = ""  # "" = runs/<config name>
    # false: start fresh; true: continue from <output_dir>/checkpoints/last.pth (an error when it is not
    # there); auto: continue when it is there, else start fresh (one job script for first start and requeue)
    resume: str = "false"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_period: int = 20  # iterations between metrics.jsonl/TensorBoard records
    # iterations between checkpoints. Pretraining: 0 = at the end of each epoch; otherwise also at an epoch's
    # end after an evaluation or once checkpoint_period iterations have passed since the last one
    checkpoint_period: int = 0
    debug_stop_at_iter: int = 0  # tests: exit abruptly at this iteration, as a killed run would
    # (localization: the R-CNN stage's iterations count on from solver.max_iter)


class Choice(str, Enum):
    """A fixed choice in a config schema: a value outside it fails when the config loads, naming the valid
    ones. Members are strings (``cfg.solver.amp == "fp16"``, dict keys, f-strings all see the value)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def _read_yaml_chain(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """Return [(file, mapping)] from the furthest ``_base_`` ancestor down to ``path``."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(seen + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    chain: list[tuple[str, dict]] = []
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        chain.extend(_read_yaml_chain(base_path, seen + (path,)))
    chain.append((path, data))
    return chain


def _check_keys(schema: DictConfig, data: dict, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in schema:
            valid = [str(k) for k in schema.keys()]
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{full}'{hint} (valid keys here: {', '.join(valid)})")
        node = schema[key]
        if isinstance(node, DictConfig) and isinstance(value, dict):
            _check_keys(node, value, source, prefix=f"{full}.")


def _parse_overrides(overrides: Sequence[str]) -> dict:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command-line overrides must be key=value, got: {' '.join(bad)}")
    # ``key=`` means the empty string (e.g. ``model.backbone.weights=`` for no weights), not null.
    overrides = [f"{o}''" if o.endswith("=") else o for o in overrides]
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: cannot parse overrides {list(overrides)}: {exc}") from exc


def _move_keys(data: dict, moved: dict[str, str], source: str) -> None:
    """Move each old dotted key found in ``data`` to its new place, in order (``a.b`` -> ``a.b.c`` moves a
    value that is not a mapping, so ``data.synthetic: true`` becomes ``data.synthetic.enabled: true``)."""
    for old, new in moved.items():
        *parents, leaf = old.split(".")
        node = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for key in new_parents:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target.setdefault(new_leaf, value)  # a layer that gives both: the new key wins
        warnings.warn(f"{source}: '{old}' is now '{new}'; read as such (update the config)", FutureWarning,
                      stacklevel=3)


def load_config(schema: type, path: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run config: schema defaults <- YAML chain (``_base_`` first) <- overrides."""
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[str, dict]] = _read_yaml_chain(path) if path else []
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    for source, data in layers:
        _move_keys(data, getattr(schema, "MOVED_KEYS", {}), source)
        _check_keys(cfg, data, source)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            message = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]  # omegaconf appends its internals
            raise ConfigError(f"{source}: {key + ': ' if key else ''}{message}") from exc
    if "resume" in cfg:  # a fixed choice: a wrong value fails here, not after the data is loaded
        from .state import resume_mode
        resume_mode(cfg.resume)
    OmegaConf.set_struct(cfg, True)
    return cfg


def config_name(path: str | None, default: str) -> str:
    """``configs/pretrain/resnet50_imagenet.yaml`` -> ``resnet50_imagenet`` (used for runs/<name>)."""
    return os.path.splitext(os.path.basename(path))[0] if path else default


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
