"""The rules of the design (DESIGN.md): the engine stands apart from the detection code; a stage reads only
what its key covers; stages stand on pipeline/, never on each other; a method is one record."""
import ast
import json
from pathlib import Path

import pytest
from conftest import SealableConfig

from pipeline.cli import build_parser, make_context
from pipeline.data.voc import VOCDataset
from pipeline.engine.runner import RunContext, plan_stages, run_stages
from pipeline.engine.stage import Shard, Stage
from pipeline.methods import METHODS
from stages import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_stage_module_imports_another():
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name != "__init__.py":
            imports = {name for name in imported_modules(path) if name == "stages" or name.startswith("stages.")}
            assert not imports, f"{path.name} imports {imports}"


def test_the_engine_imports_nothing_of_the_detection_code():
    for path in sorted((ROOT / "pipeline" / "engine").glob("*.py")):
        ours = {name for name in imported_modules(path) if name.split(".")[0] in ("pipeline", "stages")}
        assert all(name.startswith("pipeline.engine") for name in ours), (path.name, ours)


def test_only_the_cli_reaches_the_stage_registry_from_pipeline():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name != "cli.py":
            assert not {name for name in imported_modules(path) if name.split(".")[0] == "stages"}, path.name


class Sneaky(Stage):
    """Reads a config value its key does not cover, by keeping the config it was handed for its params."""
    name, shard_suffix = "sneaky", ".txt"

    def params(self, config):
        self.config = config
        return {"covered": config["sneaky"]["covered"]}

    def shards(self, ctx):
        return [Shard("00000", ())]

    def run_shard(self, ctx, shard, inputs, out):
        out.path.write_text(str(self.config["sneaky"]["not_covered"]))
        return {}


def test_a_stage_that_reads_the_config_outside_its_params_fails_while_the_config_is_sealed(shapes_root, tmp_path):
    config = SealableConfig({"data": {"train_split": "trainval", "test_split": "test"}, "torch_threads": 1,
                             "sneaky": {"covered": 1, "not_covered": 2}})
    run = RunContext(config, VOCDataset(shapes_root), tmp_path / "cache", tmp_path / "reports")
    plans = plan_stages(["sneaky"], {"sneaky": Sneaky()}, run)
    SealableConfig.sealed = True
    try:
        with pytest.raises(AssertionError, match="outside its keyed params"):
            run_stages(plans, run, "threads:1")
    finally:
        SealableConfig.sealed = False


def test_a_stage_is_handed_its_params_frozen(shapes_root, tmp_path):
    run = make_context(build_parser().parse_args(["status", "--data", str(shapes_root), "--cache", str(tmp_path)]))
    for plan in plan_stages(["timing-table", "fcn-evaluate", "localize"], REGISTRY, run):
        with pytest.raises(TypeError):
            plan.context.params["anything"] = 1  # a mappingproxy: no stage changes what its key covers


def keys(shapes_root, tmp_path, *sets) -> dict[str, str]:
    argv = ["status", "--data", str(shapes_root), "--cache", str(tmp_path), *(a for s in sets for a in ("--set", s))]
    return {plan.stage.name: plan.key
            for plan in plan_stages(list(REGISTRY), REGISTRY, make_context(build_parser().parse_args(argv)))}


def test_sppnet_images_per_shard_changes_the_keys_of_the_stages_it_cuts(shapes_root, tmp_path):
    before, after = keys(shapes_root, tmp_path), keys(shapes_root, tmp_path, "sppnet.images_per_shard=4")
    changed = {name for name in before if before[name] != after[name]}
    assert {"sppnet-conv5", "sppnet-features"} <= changed
    assert not {"proposals", "pretrain", "finetune", "features", "svm", "fast-rcnn-train"} & changed


def key_descriptions(shapes_root, tmp_path, *sets) -> dict[str, str]:
    argv = ["status", "--data", str(shapes_root), "--cache", str(tmp_path), *(a for s in sets for a in ("--set", s))]
    return {plan.stage.name: json.dumps(plan.description["params"])
            for plan in plan_stages(list(REGISTRY), REGISTRY, make_context(build_parser().parse_args(argv)))}


@pytest.mark.parametrize("setting, stages", [
    ("proposals.near_duplicate_iou=0.8", {"proposals", "timing-table", "timing-test-only"}),
    ("faster_rcnn.train_sizes=[416, 480]", {"faster-rcnn-train", "timing-test-only"}),
    ("fast_rcnn.feature_pyramid=true", {"fast-rcnn-train", "timing-test-only"})])
def test_options_added_later_stay_out_of_every_key_at_their_neutral_value(shapes_root, tmp_path, setting, stages):
    """Cached results from before an option keep their keys while it is off (pipeline.engine.config.NEUTRAL_OPTIONS)."""
    name = setting.split("=")[0].split(".")[1]
    off, on = key_descriptions(shapes_root, tmp_path), key_descriptions(shapes_root, tmp_path, setting)
    assert not [stage for stage, params in off.items() if f'"{name}"' in params]
    assert {stage for stage, params in on.items() if f'"{name}"' in params} >= stages


def test_the_shard_layout_is_part_of_the_key(shapes_root, tmp_path, monkeypatch):
    before = keys(shapes_root, tmp_path)
    features = REGISTRY["features"]
    monkeypatch.setattr(type(features), "shards", lambda self, ctx: [Shard("00000", ("one image",))])
    after = keys(shapes_root, tmp_path)
    assert after["features"] != before["features"] and after["proposals"] == before["proposals"]


def test_every_method_record_names_stages_that_exist_and_its_own_detect_and_evaluate():
    for method in METHODS.values():
        for stage in (*method.training_stages, *method.model_stages.values(), method.detect_stage,
                      method.evaluate_stage):
            assert stage in REGISTRY, (method.name, stage)
        assert REGISTRY[method.detect_stage].method is method and REGISTRY[method.evaluate_stage].method is method
        assert list(REGISTRY[method.evaluate_stage].variants) == [variant.name for variant in method.variants]
        assert method.name not in REGISTRY  # `rcnn run --methods NAME` runs a method; no stage hides behind its name
