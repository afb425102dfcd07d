import pytest

from pipeline.config import apply_override, load_config
from pipeline.errors import ConfigError


def test_demo_preset_is_the_default():
    assert load_config()["config_name"] == "demo"


def test_override_parses_value_as_yaml():
    config = load_config("demo", ["proposals.max_proposals=300", "data.classes=[a, b]"])
    assert config["proposals"]["max_proposals"] == 300
    assert config["data"]["classes"] == ["a", "b"]


def test_override_keeps_the_presets_float_type():
    config = load_config("demo", ["bbox.lambda=1000"])
    assert config["bbox"]["lambda"] == 1000.0 and isinstance(config["bbox"]["lambda"], float)


def test_override_of_unknown_key_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown key 'mdoe'.*mode"):
        apply_override(load_config(), "proposals.mdoe=opencv-fast")


def test_override_of_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="no config section 'nope'"):
        apply_override(load_config(), "nope.x=1")


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(load_config(), "proposals.mode")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: demo, voc2007"):
        load_config("nonexistent")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(path))
