"""Configuration: YAML files in ``smaf/configs/`` merged with ``key.sub=value`` overrides.

A config is a nested :class:`Config` (a dict with attribute access). Overrides are typed by the
type of the value they replace, and a key that does not exist is an error listing the valid keys at
that level, so a typo never silently becomes a new setting.

Every path a stage writes derives from ``work_dir`` (see :func:`stage_dir`), and every stage saves the
resolved config as ``config.yaml`` in its output folder (see :func:`save_config`).
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what is valid."""


class Config(dict):
    """A dict whose keys are also attributes (``cfg.train.lr``); nested dicts become Configs."""

    def __init__(self, data: Mapping | None = None):
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = Config(value) if isinstance(value, Mapping) else value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'; valid keys: {', '.join(sorted(self))}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = Config(value) if isinstance(value, Mapping) and not isinstance(value, Config) else value

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        """Plain nested dicts (for YAML dumping and pickling)."""
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """``"voc12"`` -> ``smaf/configs/voc12.yaml``; an existing file path is returned as is."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML path or one of: {available}")


def _parse_value(text: str, default: Any, key: str) -> Any:
    """Convert the override string ``text`` to the type of ``default``."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text}: expected a boolean (true/false)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"{key}={text}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text}: expected a number") from None
    if isinstance(default, (list, tuple)):
        value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
        if not isinstance(value, list):
            raise ConfigError(f"{key}={text}: expected a list such as [0.5,1.0]")
        if default and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
            try:
                value = [type(default[0])(v) if isinstance(default[0], float) else v for v in value]
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={text}: expected a list of numbers") from None
        return value
    if isinstance(default, Mapping):
        raise ConfigError(f"{key} is a section; set one of its keys: {', '.join(sorted(default))}")
    if default is None:
        return yaml.safe_load(text)
    return text


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``key.sub=value`` strings to ``cfg`` in place and return it.

    Raises ConfigError for a malformed override, an unknown key (listing the valid keys at that
    level) or a value that does not parse as the type of the current value.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: Any = cfg
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "top level"
            if not isinstance(node, Mapping) or part not in node:
                valid = ", ".join(sorted(node)) if isinstance(node, Mapping) else "(none: not a section)"
                raise ConfigError(f"unknown config key '{dotted}': valid keys at {where}: {valid}")
            if depth == len(parts) - 1:
                node[part] = _parse_value(text, node[part], dotted)
            else:
                node = node[part]
    return cfg


def load_config(name_or_path: str | os.PathLike = "voc12", overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (packaged name or path) and apply overrides.

    A config may name ``base: other`` to start from another config (packaged name or path relative to
    it); its own keys then override the base's, and it may only use keys the base has.
    """
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base_name = raw.pop("base", None)
    if base_name:
        base_path = path.parent / f"{base_name}"
        base = load_config(base_path if base_path.is_file() else base_name)
        _merge_into(base, raw, str(path))
        cfg = base
    else:
        cfg = Config(raw)
    cfg = apply_overrides(cfg, overrides)
    return cfg


def _merge_into(base: Config, update: Mapping, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown config key '{dotted}': valid keys at "
                              f"{prefix.rstrip('.') or 'top level'}: {', '.join(sorted(base))}")
        if isinstance(value, Mapping) and isinstance(base[key], Mapping):
            _merge_into(base[key], value, source, dotted + ".")
        else:
            base[key] = Config(value) if isinstance(value, Mapping) else value


def stage_dir(cfg: Config, stage: str) -> Path:
    """Output folder of ``stage`` for this run: ``<work_dir>/<stage>`` (created)."""
    path = Path(cfg.work_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_changes(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two config dicts (keys present in
    only one of them included)."""
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def save_config(cfg: Config, out_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``<out_dir>/config.yaml`` and return its path."""
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def parse_cli(argv: list[str] | None = None, description: str = "", default_config: str = "voc12"):
    """Parse ``--config NAME_OR_PATH key=value ...`` into a Config.

    Returns the Config. Config errors exit with one line (no traceback).
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=os.environ.get("CONFIG", default_config),
                        help="packaged config name (voc12, demo, pets) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train_cls.iterations=100")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
