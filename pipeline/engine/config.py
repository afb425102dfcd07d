"""Config presets (YAML) with `--set key=value` overrides.

A config is a plain nested dict. Presets live in `configs/<name>.yaml`; `--config` takes a preset
name or a path. Overrides may only set keys the preset already has, so a typo is an error rather
than a silently ignored setting.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.engine.errors import ConfigError
from pipeline.engine.schema import validate

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PRESET = "demo"
# settings added after the first cached runs, at the value that computes what those did: every stage's cache key
# leaves them out at that value (pipeline.engine.runner.plan_stages: cached results stay valid), and what reads a
# result saved before them reads a missing one as that value (with_neutral_options)
NEUTRAL_OPTIONS = {"train_sizes": [], "feature_pyramid": False, "near_duplicate_iou": 1.0}


def without_neutral_options(params):
    """Params (nested mappings) less the NEUTRAL_OPTIONS that hold their neutral value, at any depth."""
    if not isinstance(params, dict):
        return params
    return {name: without_neutral_options(value) for name, value in params.items()
            if not (name in NEUTRAL_OPTIONS and value == NEUTRAL_OPTIONS[name])}


def with_neutral_options(params) -> dict:
    """Params with every neutral option they leave out at its neutral value."""
    return {**NEUTRAL_OPTIONS, **params}


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
    config["config_name"] = path.stem
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


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

