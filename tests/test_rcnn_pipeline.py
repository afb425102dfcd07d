"""The whole R-CNN graph on the tiny generated set, as a user runs it: files, reports, reuse and resume."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from kill_at import run_killed_at
from tiny import STAGES, options

from pipeline.classifiers import load_svms
from pipeline.cli import main
from pipeline.data.voc import VOCDataset
from pipeline.engine.cache import StageCache, sha256_of
from pipeline.features import FeatureReader, layer_features
from pipeline.weights import load_finetuned

pytestmark = pytest.mark.slow

def status(data, cache, reports, capsys, *extra_sets) -> dict:
    capsys.readouterr()
    assert main(["status", "--json", *options(data, cache, reports, *extra_sets)]) == 0
    return {row["stage"]: row for row in json.loads(capsys.readouterr().out)["stages"]}


def tree_digest(directory):
    return {path.name: sha256_of(path) for path in sorted(directory.iterdir()) if path.is_file()}


def test_run_computes_every_stage_and_writes_the_reports(tiny_run, capsys):
    data, cache, reports = tiny_run
    rows = status(data, cache, reports, capsys)
    assert [rows[stage]["state"] for stage in STAGES] == ["cached"] * len(STAGES)
    metrics = rows["rcnn-evaluate"]["metrics"]
    assert metrics["ap_voc07_11pt"]["circle"] is None  # the tiny test split has no circle
    # the mean over the classes the test split holds: a class without ground truth is left out, not a zero
    present = [ap for ap in metrics["ap_voc07_11pt"].values() if ap is not None]
    assert len(present) == len(metrics["ap_voc07_11pt"]) - 1
    assert metrics["map_voc07_11pt"] == pytest.approx(sum(present) / len(present))
    assert {"svm_bbox", "svm", "softmax_bbox", "softmax"} == set(metrics["variants"])
    bbox_effect = metrics["differences"]["svm"]["0.5"]  # the result against the ablation without regression
    without_bbox = metrics["variants"]["svm"]["map_all_point@0.5"]
    assert bbox_effect["difference"] == pytest.approx(metrics["map_all_point"] - without_bbox)
    report = reports / "demo" / "rcnn-evaluate"
    assert {"map.md", "map.json", "pr_curves.png", "detections"} <= {p.name for p in report.iterdir()}
    assert "IoU" in (reports / "demo" / "rcnn-evaluate" / "map.md").read_text()
    assert rows["features"]["metrics"]["bytes_per_region"] > 0


def test_devkit_results_files_use_one_based_corners_inside_the_image(tiny_run):
    data, _, reports = tiny_run
    dataset = VOCDataset(data)
    results = reports / "demo" / "rcnn-detect" / "results"
    assert sorted(path.name for path in results.iterdir()) == sorted(f"comp4_det_test_{name}.txt"
                                                                     for name in dataset.classes)
    lines = [line.split() for path in results.iterdir() for line in path.read_text().splitlines()]
    assert lines
    for image_id, score, xmin, ymin, xmax, ymax in lines:
        annotation = dataset.annotation(image_id)
        assert image_id in dataset.image_ids("test")
        assert 1 <= float(xmin) <= float(xmax) <= annotation.width
        assert 1 <= float(ymin) <= float(ymax) <= annotation.height


def test_features_are_quantised_chunked_and_compressed_per_training_image(tiny_run, capsys):
    data, cache, reports = tiny_run
    key = status(data, cache, reports, capsys)["features"]["key"]
    shards = sorted((cache / "features" / key).glob("*.h5"))
    with h5py.File(shards[0], "r") as opened:
        assert opened.attrs["kind"] == "pool5"
        group = opened[next(iter(opened))]
        features = group["features"]
        assert features.dtype == np.uint8 and features.chunks and features.compression == "lzf"
        assert group["feature_step"].shape == group["feature_offset"].shape == (features.shape[0],)
        assert (group["gt_label"][()] >= 0).sum() >= 1 and group["boxes"].shape[0] == features.shape[0]
    stored = set()
    for shard in shards:
        with h5py.File(shard, "r") as opened:
            stored.update(opened)
    assert stored == set(VOCDataset(data).image_ids("trainval"))  # the test images' come from rcnn-detect


def test_training_losses_go_down(tiny_run, capsys):
    data, cache, reports = tiny_run
    rows = status(data, cache, reports, capsys)
    for stage in ("pretrain", "finetune"):
        losses = torch.load(cache / stage / rows[stage]["key"] / "00000.pt", weights_only=True)["losses"]
        assert np.mean(losses[-6:]) < np.mean(losses[:6]), stage


def test_changing_an_svm_param_reuses_proposals_finetuning_and_features(tiny_run, tmp_path, capsys):
    data, original_cache, reports = tiny_run
    cache = shutil.copytree(original_cache, tmp_path / "cache")
    before = status(data, cache, reports, capsys)
    upstream = ["proposals", "pretrain", "finetune", "features", "bbox"]
    digests = {stage: tree_digest(cache / stage / before[stage]["key"]) for stage in upstream}
    capsys.readouterr()
    assert main(["run", *options(data, cache, tmp_path / "reports", "svm.C=0.01")]) == 0
    printed = capsys.readouterr().out
    after = status(data, cache, reports, capsys, "svm.C=0.01")
    for stage in upstream:
        assert after[stage]["key"] == before[stage]["key"], stage
        assert tree_digest(cache / stage / after[stage]["key"]) == digests[stage], stage
        assert f"{stage:<24} cached" in printed
    for stage in ("svm", "rcnn-detect", "rcnn-evaluate"):
        assert after[stage]["key"] != before[stage]["key"] and f"{stage:<24} computed" in printed


def test_killed_features_run_resumes_at_the_first_missing_shard_with_an_identical_result(tiny_run, tmp_path, capsys):
    data, original_cache, reports = tiny_run
    key = status(data, original_cache, reports, capsys)["features"]["key"]
    cache = shutil.copytree(original_cache, tmp_path / "cache")
    shutil.rmtree(cache / "features" / key)
    key_dir = cache / "features" / key
    run_killed_at("record", "features", 2, ["features", "--scheduler", "threads:1",
                                            *options(data, cache, tmp_path / "reports")])
    done_before = {path.name: path.stat().st_mtime_ns for path in key_dir.glob("*.done.json")}
    assert not (key_dir / "manifest.json").exists() and len(done_before) < 8
    assert main(["features", *options(data, cache, tmp_path / "reports")]) == 0
    assert {name: (key_dir / name).stat().st_mtime_ns for name in done_before} == done_before
    for shard in sorted((original_cache / "features" / key).glob("*.h5")):
        with h5py.File(shard, "r") as expected, h5py.File(key_dir / shard.name, "r") as resumed:
            for image_id in expected:
                for name in ("boxes", "gt_label", "features"):
                    assert np.array_equal(expected[image_id][name][()], resumed[image_id][name][()])


def assert_killed_training_resumes_identically(stage: str, key: str, original_cache, tmp_path, argv_of) -> None:
    """Copy the cache without `stage`'s output, SIGKILL `rcnn <stage>` once it has checkpointed, run it
    again: the weights and losses equal those of the original, uninterrupted run. argv_of(cache) -> options."""
    cache = shutil.copytree(original_cache, tmp_path / "cache")
    shutil.rmtree(cache / stage / key)
    checkpoint = cache / stage / key / "00000.checkpoint"
    run_killed_at("checkpoint", stage, 1, [stage, *argv_of(cache)])
    assert not (cache / stage / key / "00000.pt").exists()
    assert main([stage, *argv_of(cache)]) == 0
    assert not checkpoint.exists()
    expected = torch.load(original_cache / stage / key / "00000.pt", weights_only=True)
    resumed = torch.load(cache / stage / key / "00000.pt", weights_only=True)
    assert expected["losses"] == resumed["losses"]
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_killed_finetuning_resumes_from_its_checkpoint_with_identical_weights(tiny_run, tmp_path, capsys):
    data, original_cache, reports = tiny_run
    key = status(data, original_cache, reports, capsys)["finetune"]["key"]
    assert_killed_training_resumes_identically("finetune", key, original_cache, tmp_path,
                                               lambda cache: options(data, cache, tmp_path / "reports"))


def test_pipeline_runs_on_any_voc_layout_set_with_classes_from_its_annotations(shapes_copy, tmp_path, capsys):
    renamed = {"circle": "disc", "cross": "plus", "hexagon": "nut", "square": "tile", "star": "asterisk",
               "triangle": "wedge"}
    for path in (shapes_copy / "Annotations").iterdir():
        text = path.read_text()
        for old, new in renamed.items():
            text = text.replace(f"<name>{old}</name>", f"<name>{new}</name>")
        path.write_text(text)
    assert main(["run", *options(shapes_copy, tmp_path / "cache", tmp_path / "reports")]) == 0
    table = (tmp_path / "reports" / "demo" / "rcnn-evaluate" / "map.md").read_text()
    assert all(f"| {name} |" in table for name in renamed.values())


def test_each_svm_sees_the_features_that_rank_its_held_back_images_best(tiny_run, capsys):
    """On this undertrained network, R-CNN's raw fc7 makes some SVMs rank held-back positives below negatives:
    their w points against the mean feature (the SVM spends it as its offset). Centred, most such SVMs rank them
    better and above chance (which ones is float rounding's draw: the network's training amplifies it; one at
    0.34 raw stayed at 0.34 centred on an AMD machine). By construction, each class uses the treatment that
    ranks its held-back images best. "Below" means an AUC under 0.4: with 5 to 9 held-back positives a class's
    AUC moves by about 0.1 by chance, so one at 0.49 is at chance, not inverted."""
    data, cache, reports = tiny_run
    rows = status(data, cache, reports, capsys)
    per_class = rows["svm"]["metrics"]["per_class"]
    raw = [stats["held_back_auc_raw"] for stats in per_class.values()]
    used = [stats["held_back_auc"] for stats in per_class.values()]
    inverted = [name for name, stats in per_class.items() if stats["held_back_auc_raw"] < 0.4]
    centred_aucs = [per_class[name]["held_back_auc_centred"] for name in inverted]
    improved = [auc > per_class[name]["held_back_auc_raw"] for name, auc in zip(inverted, centred_aucs)]
    assert inverted and sum(improved) > len(inverted) / 2, (raw, centred_aucs)
    assert np.median(centred_aucs) > 0.5, (raw, used)
    for stats in per_class.values():
        assert stats["held_back_auc"] == max(stats["held_back_auc_raw"], stats["held_back_auc_centred"])
    net, _, classes = load_finetuned(StageCache(cache, "finetune", rows["finetune"]["key"], ".pt"), "cpu")
    svms = load_svms(StageCache(cache, "svm", rows["svm"]["key"], ".npz"), len(classes))
    reader = FeatureReader(StageCache(cache, "features", rows["features"]["key"]))
    mean = np.concatenate([layer_features(net, reader.read(image_id).features, "fc7", "cpu")
                           for image_id in reader.file_of]).mean(axis=0)
    cosines = svms["weights"] @ mean / np.linalg.norm(svms["weights"], axis=1) / np.linalg.norm(mean)
    centred = np.array([per_class[name]["center"] for name in classes])
    assert centred.any() and (cosines[centred] > -0.3).all(), cosines
