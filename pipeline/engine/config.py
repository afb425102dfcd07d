"""Config presets (YAML) with `--set key=value` overrides.

A config is a plain nested dict. Presets live in `configs/<name>.yaml`; `--config` takes a preset
name or a path. The demo preset holds every key (pipeline.engine.schema.REFERENCE); any other preset or
file may leave keys out, which then take the demo preset's values. Overrides may only set keys that exist,
so a typo is an error rather than a silently ignored setting.

Options added after results were cached are registered with the value that computes what those results
did (`register_neutral_option`): at that value they are left out of every key (pipeline.engine.runner), so
the cached results stay valid.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from pipeline.engine.errors import ConfigError
from pipeline.engine.schema import REFERENCE, validate

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PRESET = "demo"
# dotted config key -> its neutral value (module docstring), registered where the option is defined
NEUTRAL_OPTIONS: dict[str, object] = {}


def register_neutral_option(key: str, neutral_value) -> None:
    NEUTRAL_OPTIONS[key] = neutral_value


def without_neutral_options(config: dict) -> dict:
    """The config less the registered options that hold their neutral value: what cache keys are made from."""
    kept = copy.deepcopy(config)
    for key, neutral_value in NEUTRAL_OPTIONS.items():
        *sections, name = key.split(".")
        section = kept
        for part in sections:
            section = section.get(part, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict) and name in section and section[name] == neutral_value:
            del section[name]
    return kept


def resolve_config_path(name_or_path: str | None) -> Path:
    """A path as given, else the preset `configs/<name>.yaml` shipped with the project."""
    name_or_path = name_or_path or DEFAULT_PRESET
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file or preset (presets: {known})")


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> dict:
    path = resolve_config_path(name_or_path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    config = with_defaults(config, yaml.safe_load(REFERENCE.read_text()))
    config["config_name"] = path.stem
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def with_defaults(config: dict, reference: dict) -> dict:
    """The config with every key it leaves out taken from the reference (at any depth)."""
    merged = dict(config)
    for name, default in reference.items():
        if name not in merged:
            merged[name] = copy.deepcopy(default)
        elif isinstance(default, dict) and isinstance(merged[name], dict):
            merged[name] = with_defaults(merged[name], default)
    return merged


def yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where PyYAML found the problem (1-based line and column) and what it is."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def apply_override(config: dict, override: str) -> None:
    """Set one dotted key from `key=value`; the value is parsed as YAML (numbers, lists, bools)."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. proposals.mode=opencv-fast")
    *parents, leaf = key.split(".")
    section = config
    for depth, part in enumerate(parents):
        section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"--set {key}: no config section {'.'.join(parents[:depth + 1])!r}")
    if leaf not in section:
        known = ", ".join(sorted(section))
        raise ConfigError(f"--set {key}: unknown key {leaf!r} (known here: {known})")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {override!r}: value is not valid YAML") from None
    if isinstance(section[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # lambda=1000 means the preset's 1000.0, and must give the same cache key
    section[leaf] = value

