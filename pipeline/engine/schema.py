"""The config's schema: every key's type and range, checked before anything is planned or run.

The type of a key is that of its value in the demo preset (configs/demo.yaml, the reference every preset
has the same keys as; a whole number is accepted where a decimal is expected). A key that names one of a
set of choices (a backbone, a proposal method, ...) is checked against the choices its module registered
with `register_choices`, where they are defined; any other key's range is the first of `rules()` whose
pattern matches the dotted key. Sections must be mappings. A config that breaks the schema is a one-line
error naming the key, the value and what is expected, before any stage runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection
from fnmatch import fnmatch
from pathlib import Path

import yaml

from pipeline.engine.errors import ConfigError

REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
Check = Callable[[object], bool]
# key pattern -> the collection its value must be in, registered by the module that defines the choices
CHOICES: dict[str, Collection] = {}
# checks of the whole config (several keys together, e.g. a crop size against the backbone), registered by the
# module that knows the rule: each raises a ConfigError
CHECKS: list[Callable[[dict], None]] = []


def register_choices(pattern: str, choices: Collection) -> None:
    """The values a config key (or every key matching `pattern`, e.g. "*.pooling") may take. A registry
    (a dict that grows as parts register) is read when a config is checked, so later entries count."""
    CHOICES[pattern] = choices


def register_check(check: Callable[[dict], None]) -> Callable[[dict], None]:
    """Run `check(config)` on every config, after each key passed its own check."""
    CHECKS.append(check)
    return check


def positive(value) -> bool:
    return value > 0


def non_negative(value) -> bool:
    return value >= 0


def fraction(value) -> bool:
    return 0 <= value <= 1


def open_fraction(value) -> bool:
    return 0 < value <= 1


def below_one(value) -> bool:
    return 0 <= value < 1


def anything(value) -> bool:
    return True


def each(check: Check) -> Check:
    return lambda values: all(check(value) for value in values)


def choices_of(names: Collection) -> tuple[Check, str]:
    return (lambda value: value in names), f"one of {', '.join(map(str, names))}"


register_choices("device", ("auto", "cpu", "cuda"))


def rules() -> list[tuple[str, Check, str]]:
    """(pattern, check, what is expected); the first pattern that matches a key applies: the registered
    choices first, then the ranges below."""
    return [
        *((pattern, *choices_of(choices)) for pattern, choices in CHOICES.items()),
        ("data.*", anything, "a string or a list of class names"),
        ("backbone.weights", anything, "pretrain, none, torchvision, package or the path of a weights file"),
        ("*_dir", anything, "a folder"),
        ("scheduler", anything, "a scheduler"),
        ("*.ious", each(open_fraction), "numbers in (0, 1]"),
        ("*iou*", open_fraction, "a number in (0, 1]"),
        ("*fraction", fraction, "a number in [0, 1]"),
        ("*.momentum", below_one, "a number in [0, 1)"),
        ("*.lr", open_fraction, "a number in (0, 1]"),
        ("*.gamma", open_fraction, "a number in (0, 1]"),
        ("*.step", open_fraction, "a number in (0, 1]"),
        ("fcn.scale", positive, "a positive number"),
        ("*_threshold", anything, "a number"),
        ("*seed", non_negative, "a whole number >= 0"),
        ("*.svd_ranks", each(non_negative), "whole numbers >= 0 (0: no truncation)"),
        ("*.skips", non_negative, "a whole number >= 0"),
        ("*.pictures", non_negative, "a whole number >= 0"),
        ("timing.warmup", non_negative, "a whole number >= 0"),
        ("*.weight_decay", non_negative, "a number >= 0"),
        ("*.context_pad", non_negative, "a number >= 0"),
        ("torch_threads", non_negative, "a whole number >= 0 (0: every core)"),
        ("proposals.search_side", non_negative, "a whole number >= 0 (0: never shrink the image)"),
        ("proposals.min_size", non_negative, "a number >= 0"),
        ("*.end_to_end_iterations", non_negative, "a whole number >= 0 (0: skip the phase)"),
        ("*.warmup", non_negative, "a whole number >= 0 (0: no warm-up)"),
        ("*.baseline_images", non_negative, "a whole number >= 0"),
        ("svm.check_every", non_negative, "a whole number >= 0 (0: no check)"),
        ("svm.center", lambda value: len(value) > 0, "a list of one or two of false, true"),
        ("*", lambda value: all(map(positive, numbers_in(value))),  # strings: their type is all there is to check
         "a positive number (or a list of them)"),
    ]


def validate(config: dict, reference: dict | None = None) -> None:
    """Raise a ConfigError for the first key whose value has the wrong type or lies out of range, or that
    no preset has."""
    reference = reference or yaml.safe_load(REFERENCE.read_text())
    checks, known, source = rules(), flatten(reference), f"config {config.get('config_name', '')}".strip()
    for key, expected in known.items():
        value = lookup(config, key, source)
        if not same_type(value, expected):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {type_name(expected)}")
        if not all(map(math.isfinite, numbers_in(value))):
            raise ConfigError(f"{source}: {key} = {value!r}: expected finite numbers (not inf or nan)")
        check, what = next((check, what) for pattern, check, what in checks if fnmatch(key, pattern))
        if not isinstance(value, bool) and not check(value):  # a flag's type is all there is to check
            raise ConfigError(f"{source}: {key} = {value!r}: expected {what}")
    unknown = sorted(set(flatten(config)) - set(known) - {"config_name"})
    if unknown:
        section = unknown[0].rpartition(".")[0]
        siblings = sorted(key.rpartition(".")[2] for key in known if key.rpartition(".")[0] == section)
        raise ConfigError(f"{source}: {unknown[0]}: unknown key (known here: {', '.join(siblings)})")
    for check in CHECKS:
        try:
            check(config)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None


def numbers_in(value) -> list[float]:
    """The number a value is, or the numbers a list of them holds (flags and strings hold none)."""
    values = value if isinstance(value, list) else [value]
    return [item for item in values if isinstance(item, (int, float)) and not isinstance(item, bool)]


def flatten(section: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value for every leaf (a list is a leaf)."""
    leaves = {}
    for name, value in section.items():
        if isinstance(value, dict):
            leaves.update(flatten(value, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = value
    return leaves


def lookup(config: dict, key: str, source: str):
    """The value at a dotted key; a ConfigError when a section on the way is missing or not a mapping."""
    section, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[:depth])} = {section!r}: expected a mapping of settings")
        if part not in section:
            raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])} is missing (every preset in configs/ has it)")
        section = section[part]
    return section


def same_type(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    if isinstance(expected, list):
        return isinstance(value, list) and (not expected or not value or
                                             all(same_type(item, expected[0]) for item in value))
    return isinstance(value, type(expected))


def type_name(expected) -> str:
    if isinstance(expected, bool):
        return "true or false"
    if isinstance(expected, float):
        return "a number"
    if isinstance(expected, int):
        return "a whole number"
    if isinstance(expected, list):
        return f"a list of {type_name(expected[0]).removeprefix('a ')}s" if expected else "a list"
    return "a string" if isinstance(expected, str) else type(expected).__name__
