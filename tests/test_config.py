import pytest
import yaml

from pipeline import models, roi
from pipeline.engine import schema
from pipeline.engine.config import PRESET_DIR, apply_override, load_config
from pipeline.engine.errors import ConfigError


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
    with pytest.raises(ConfigError, match="presets: demo, photos, voc2007"):
        load_config("nonexistent")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(path))


@pytest.mark.parametrize("preset", sorted(path.stem for path in PRESET_DIR.glob("*.yaml")))
def test_every_preset_has_the_schemas_keys_types_and_ranges(preset):
    load_config(preset)  # validates


@pytest.mark.parametrize("override, message", [
    ("svm.C=abc", "svm.C = 'abc': expected a number"),
    ("svm.C=-1", "svm.C = -1.0: expected a positive number"),
    ("svm=3", "svm = 3: expected a mapping of settings"),
    ("finetune.iterations=2.5", "finetune.iterations = 2.5: expected a whole number"),
    ("finetune.augment=1", "finetune.augment = 1: expected true or false"),
    ("evaluate.ious=[0.5, 1.5]", "evaluate.ious = [0.5, 1.5]: expected numbers in (0, 1]"),
    ("sppnet.scales=[144, big]", "sppnet.scales = [144, 'big']: expected a list of whole numbers"),
    ("detect.nms_iou=0", "detect.nms_iou = 0.0: expected a number in (0, 1]"),
    ("finetune.momentum=1", "finetune.momentum = 1.0: expected a number in [0, 1)"),
    ("features.dtype=int8", "features.dtype = 'int8': expected one of uint8, float16, float32"),
])
def test_a_value_of_the_wrong_type_or_range_is_one_line_naming_key_value_and_what_is_expected(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config("demo", [override])
    assert str(caught.value) == f"config demo: {message}" or str(caught.value).startswith(f"config demo: {message}")


def test_an_unknown_key_in_a_config_file_is_an_error_naming_the_known_ones(tmp_path):
    config = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    config["svm"]["CC"] = 0.1
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"config mine: svm.CC: unknown key \(known here: .*C, "):
        load_config(str(path))


def test_a_config_file_may_leave_keys_out_which_take_the_demo_presets_values(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("backbone:\n  name: vgg16\n  input_size: 224\nsvm:\n  C: 0.01\n")
    config, demo = load_config(str(path)), load_config("demo")
    assert config["backbone"] == {**demo["backbone"], "name": "vgg16", "input_size": 224}
    assert config["svm"] == {**demo["svm"], "C": 0.01} and config["finetune"] == demo["finetune"]
    assert config["config_name"] == "mine"


def test_a_choice_is_checked_against_the_choices_its_module_registered():
    assert schema.CHOICES["backbone.name"] is models.BACKBONES and schema.CHOICES["*.pooling"] is roi.POOLINGS
    with pytest.raises(ConfigError, match=r"backbone.name = 'lenet': expected one of small, alexnet, vgg16, "):
        load_config("demo", ["backbone.name=lenet"])
    with pytest.raises(ConfigError, match=r"fast_rcnn.pooling = 'avg': expected one of roi_pool, roi_align"):
        load_config("demo", ["fast_rcnn.pooling=avg"])


def test_a_bad_value_stops_the_command_before_anything_runs(rcnn, tmp_path, capsys):
    assert rcnn("svm", "--set", "svm.C=abc") == 2
    assert capsys.readouterr().err == "rcnn: error: config demo: svm.C = 'abc': expected a number\n"
    assert not (tmp_path / "cache" / "proposals").exists()
