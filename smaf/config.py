"""Configuration: YAML files in ``smaf/configs/`` merged with ``key.sub=value`` overrides.

A config is a nested :class:`Config` (a dict with attribute access). Overrides are typed by the
type of the value they replace, and a key that does not exist is an error listing the valid keys at
that level, so a typo never silently becomes a new setting.

**Fragments.** A method brings its config defaults with it: a section key named after a fragment kind
(:data:`FRAGMENT_KINDS`: ``method``, ``optimizer``) selects the YAML file
``smaf/configs/<kind>s/[<section>/]<name>.yaml`` (:func:`fragment_dir`), whose keys become the section's ``<name>`` sub-section (for instance
``train_cls.method: eps`` brings ``train_cls.eps.tau`` and ``train_cls.eps.lam``). A dataset config may set
any fragment's keys; the resolved config keeps only the selected fragments, so ``voc12.yaml`` stays a list of
the pipeline's own keys. :func:`derive` switches a selector on a loaded config and brings the new fragment.

**Moved keys** (:data:`MOVED_KEYS`) still work in files and overrides; they are rewritten to their new place
with a warning saying where the key lives now.

Every path a stage writes derives from ``work_dir`` (see :mod:`smaf.run_layout`), and every stage saves the
resolved config as ``config.yaml`` in its output folder (see :func:`save_config`).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .runtime import SmafError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


#: Section keys that select a config fragment: ``<section>.<kind>: <name>`` merges the fragment file
#: ``<name>.yaml`` of :func:`fragment_dir` as ``<section>.<name>``.
FRAGMENT_KINDS = ("method", "optimizer", "preset")

#: Keys that moved, old dotted name -> new dotted name (old configs and commands keep working, with a warning).
MOVED_KEYS = {
    "train_cls.loss": "train_cls.method",
    "train_cls.tau": "train_cls.eps.tau",
    "train_cls.lam": "train_cls.eps.lam",
    "train_cls.momentum": "train_cls.poly_sgd.momentum",
    "train_fusion.momentum": "train_fusion.poly_sgd.momentum",
    "fusion.scales": "inference.scales",
    "fusion.flip": "inference.flip",
    "fusion.base_long": "inference.base_long",
    "fusion.channels_last": "inference.channels_last",
    "fusion.bg_threshold": "inference.bg_threshold",
    "fusion.bg_method": "inference.bg_method",
    "pseudo_masks.bg_threshold": "inference.bg_threshold",
    "pseudo_masks.bg_method": "inference.bg_method",
}
_LOG = logging.getLogger("smaf.config")


class ConfigError(SmafError, ValueError):
    """A config file or override is wrong; the message says which key and what is valid."""


#: Attribute of a section holding the fragments it does not select, as the config files resolved them (not keys:
#: never dumped or compared), so that :func:`derive` switching a selector brings the config's settings of the
#: newly selected fragment (e.g. ``demo.yaml``'s ``a2gnn.box.epochs``), not only the fragment file's defaults.
_UNSELECTED = "_unselected_fragments"


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
        new = Config()
        for key, value in self.items():
            new[key] = copy.deepcopy(value, memo)      # nested Configs copy themselves (and their stash)
        stash = self.__dict__.get(_UNSELECTED)
        if stash is not None:
            object.__setattr__(new, _UNSELECTED, copy.deepcopy(stash, memo))
        return new

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
        value = _yaml_value(text if text.strip().startswith("[") else f"[{text}]", key, text,
                            "a list such as [0.5,1.0]")
        if not isinstance(value, list):
            raise ConfigError(f"{key}={text}: expected a list such as [0.5,1.0]")
        if default and all(_is_number(v) for v in default):
            if not all(_is_number(v) for v in value):
                raise ConfigError(f"{key}={text}: expected a list of numbers")
            if isinstance(default[0], float):
                value = [float(v) for v in value]
        return value
    if isinstance(default, Mapping):
        raise ConfigError(f"{key} is a section; set one of its keys: {', '.join(sorted(default))}")
    if default is None:
        return _yaml_value(text, key, text, "a YAML value")
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _yaml_value(source: str, key: str, text: str, expected: str) -> Any:
    """``source`` parsed as YAML; malformed YAML is a one-line ConfigError for the override ``key=text``."""
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}={text}: expected {expected} ({str(err).splitlines()[0]})") from None


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``key.sub=value`` strings to ``cfg`` in place and return it.

    Raises ConfigError for a malformed override, an unknown key (listing the valid keys at that
    level) or a value that does not parse as the type of the current value.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        dotted = _moved(dotted.strip(), "override")
        parts = dotted.split(".")
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


def _moved(dotted: str, where: str) -> str:
    """The current name of a dotted key (itself unless it is in :data:`MOVED_KEYS`); warns when it moved."""
    new = MOVED_KEYS.get(dotted)
    if new is None:
        return dotted
    _LOG.warning("config key '%s' (%s) is now '%s'; using it there", dotted, where, new)
    return new


def _flatten(data: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _rewrite_moved(raw: Mapping, source: str) -> dict:
    """``raw`` (a parsed YAML mapping) with moved keys rewritten to their new place."""
    if not any(key in raw for key in {k.split(".")[0] for k in MOVED_KEYS}):
        return dict(raw)
    out: dict = {}
    for dotted, value in _flatten(raw).items():
        node = out
        *path, last = _moved(dotted, source).split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def fragment_dir(kind: str, section: str) -> Path:
    """Where the fragments of ``kind`` for ``section`` live: ``smaf/configs/<kind>s/<section>/`` when that
    folder exists (methods are per stage), else ``smaf/configs/<kind>s/`` (optimizers serve every stage)."""
    per_section = CONFIG_DIR / f"{kind}s" / section
    return per_section if per_section.is_dir() else CONFIG_DIR / f"{kind}s"


def fragment_names(kind: str, section: str) -> list[str]:
    """The fragments of ``kind`` available to ``section`` (e.g. every stage-0 method for ``train_cls``)."""
    return sorted(p.stem for p in fragment_dir(kind, section).glob("*.yaml"))


def read_fragment(kind: str, section: str, name: str) -> Config:
    """The defaults of fragment ``name``; an unknown name is a ConfigError naming the key and the valid values."""
    path = fragment_dir(kind, section) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{section}.{kind}={name!r}: expected one of {', '.join(fragment_names(kind, section))}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return Config(raw)


def _selectors(cfg: Config):
    """(section name, section, kind) for every fragment selector of ``cfg``."""
    for name, section in cfg.items():
        if isinstance(section, Config):
            for kind in FRAGMENT_KINDS:
                if kind in section:
                    yield name, section, kind


def _add_all_fragments(cfg: Config) -> None:
    """Give every section with a fragment selector the sub-sections of all fragments of that kind, so that
    configs built on it and overrides may set any of them (:func:`_drop_unselected` removes the others)."""
    for name, section, kind in _selectors(cfg):
        for fragment in fragment_names(kind, name):
            section.setdefault(fragment, read_fragment(kind, name, fragment))


def _drop_unselected(cfg: Config) -> None:
    for name, section, kind in _selectors(cfg):
        selected = str(section[kind])
        read_fragment(kind, name, selected)   # an unknown name fails here, listing the valid ones
        stash = section.__dict__.setdefault(_UNSELECTED, {})
        for fragment in fragment_names(kind, name):
            if fragment != selected and fragment in section:
                stash[fragment] = section.pop(fragment)


def load_config(name_or_path: str | os.PathLike = "voc12", overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (packaged name or path) and apply overrides.

    A config may name ``base: other`` to start from another config (packaged name or path relative to
    it); its own keys then override the base's, and it may only use keys the base has (or those of the
    fragments its selectors can choose). The resolved config holds the selected fragments only.
    """
    cfg = _load_chain(name_or_path)
    cfg = apply_overrides(cfg, overrides)
    _drop_unselected(cfg)
    return cfg


def _load_chain(name_or_path: str | os.PathLike) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    raw = dict(raw)
    base_name = raw.pop("base", None)
    raw = _rewrite_moved(raw, str(path))
    if base_name:
        base_path = path.parent / f"{base_name}"
        cfg = _load_chain(base_path if base_path.is_file() else base_name)
        _merge_into(cfg, raw, str(path))
        return cfg
    cfg = Config(raw)
    _add_all_fragments(cfg)
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


def derive(cfg: Config, **changes) -> Config:
    """A deep copy of ``cfg`` with ``section__key=value`` changes (keys must exist). Setting a fragment
    selector (``train_cls__method="eps"``) brings that fragment's defaults and drops the previous one's."""
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = new
        for part in path:
            node = node[part]
        if last not in node:
            raise ConfigError(f"unknown config key '{'.'.join(path + [last])}'")
        if last in FRAGMENT_KINDS and node[last] != value:
            stash = node.__dict__.setdefault(_UNSELECTED, {})
            fragment = stash.pop(str(value), None)    # the config's own settings of that fragment, when it had any
            if fragment is None:
                fragment = read_fragment(last, path[-1] if path else "", str(value))
            if str(node[last]) in node:
                stash[str(node[last])] = node.pop(str(node[last]))
            node.setdefault(str(value), fragment)
        node[last] = value
    return new


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


def parse_cli(argv: list[str] | None = None, description: str = "", default_config: str = "voc12") -> Config:
    """Parse ``--config NAME_OR_PATH key=value ...`` into a Config (a bad config raises :class:`ConfigError`)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=os.environ.get("CONFIG", default_config),
                        help="packaged config name (voc12, demo, pets) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train_cls.iterations=100")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)
