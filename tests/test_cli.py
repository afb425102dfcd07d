"""`rcnn` as a user runs it, in-process, on the tiny generated set."""
import json

import cv2
import pytest

from pipeline import proposals as proposals_module
from pipeline.cli import build_parser, main
from pipeline.engine.cache import StageCache, sha256_of
from pipeline.proposals import read_proposals


def status_json(rcnn, capsys, *args, data=None) -> dict:
    capsys.readouterr()
    assert rcnn("status", "--json", *args, data=data) == 0
    return {row["stage"]: row for row in json.loads(capsys.readouterr().out)["stages"]}


def cache_of(tmp_path, row) -> StageCache:
    return StageCache(tmp_path / "cache", row["stage"], row["key"])


def test_every_option_of_every_command_is_explained():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("proposals", "run", "status"):
        for action in commands[name]._actions:
            assert action.help, f"rcnn {name} {action.option_strings} has no help"


@pytest.mark.parametrize("argv", [["--help"], ["proposals", "--help"], ["run", "--help"], ["data", "shapes", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "usage: rcnn" in capsys.readouterr().out


def test_proposals_then_warm_rerun_recomputes_nothing(rcnn, tmp_path, capsys):
    assert rcnn("proposals") == 0
    assert "computed" in capsys.readouterr().out
    row = status_json(rcnn, capsys)["proposals"]
    assert row["state"] == "cached" and row["shards_done"] == row["shards"]
    assert row["metrics"]["recall@0.5"] > 0.8 and row["metrics"]["images"] == 16
    manifest = cache_of(tmp_path, row).manifest_path
    before = manifest.stat().st_mtime_ns
    assert rcnn("proposals") == 0
    assert "cached" in capsys.readouterr().out and manifest.stat().st_mtime_ns == before
    report = tmp_path / "reports" / "demo" / "proposals"
    assert {"recall.md", "recall.json", "recall.png"} <= {path.name for path in report.iterdir()}


def test_changing_a_proposals_param_gives_a_new_key_and_keeps_the_old(rcnn, tmp_path, capsys):
    assert rcnn("proposals") == 0
    first = status_json(rcnn, capsys)["proposals"]
    assert rcnn("proposals", "--set", "proposals.max_proposals=50") == 0
    second = status_json(rcnn, capsys, "--set", "proposals.max_proposals=50")["proposals"]
    assert second["key"] != first["key"] and second["stale_keys"] == [first["key"]]
    assert max(len(boxes) for boxes in read_proposals(cache_of(tmp_path, second)).values()) <= 50
    assert cache_of(tmp_path, first).is_complete()


def test_bad_image_stops_with_one_line_naming_it_and_damages_nothing(rcnn, shapes_copy, tmp_path, capsys):
    assert rcnn("proposals", data=shapes_copy) == 0
    (good_dir,) = [path for path in (tmp_path / "cache" / "proposals").iterdir() if path.is_dir()]
    good_files = {path.name: sha256_of(path) for path in good_dir.iterdir() if path.is_file()}
    image_id = (shapes_copy / "ImageSets/Main/test.txt").read_text().split()[-1]
    image = shapes_copy / "JPEGImages" / f"{image_id}.jpg"
    image.write_bytes(image.read_bytes()[:500])
    capsys.readouterr()
    assert rcnn("proposals", data=shapes_copy) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(image) in error and "truncated" in error and "--on-bad-input skip" in error
    assert {path.name: sha256_of(path) for path in good_dir.iterdir() if path.is_file()} == good_files
    for key_dir in (tmp_path / "cache" / "proposals").iterdir():
        if key_dir.is_dir() and key_dir != good_dir:
            assert not (key_dir / "manifest.json").exists()
            for record in key_dir.glob("*.done.json"):  # every finished shard is intact
                assert (sha256_of(key_dir / json.loads(record.read_text())["file"])
                        == json.loads(record.read_text())["sha256"])


def test_skip_mode_leaves_bad_items_out_and_lists_them(rcnn, shapes_copy, tmp_path, capsys):
    image_id = (shapes_copy / "ImageSets/Main/test.txt").read_text().split()[0]
    image = shapes_copy / "JPEGImages" / f"{image_id}.jpg"
    image.write_bytes(b"not an image")
    assert rcnn("proposals", "--on-bad-input", "skip", data=shapes_copy) == 0
    row = status_json(rcnn, capsys, "--on-bad-input", "skip", data=shapes_copy)["proposals"]
    assert row["metrics"]["images"] == 15 and str(image) in row["metrics"]["skipped"]
    assert str(image) in (tmp_path / "reports" / "demo" / "proposals" / "recall.md").read_text()


def test_opencv_failure_on_one_image_is_reported_by_name(rcnn, shapes_root, monkeypatch, capsys):
    failing_id = (shapes_root / "ImageSets/Main/test.txt").read_text().split()[0]
    failing_shape = cv2.imread(str(shapes_root / "JPEGImages" / f"{failing_id}.jpg")).shape
    real_search = proposals_module.selective_search

    def search_that_asserts(rgb, params):
        if rgb.shape == failing_shape:
            raise cv2.error("OpenCV(5.0.0) graphsegmentation.cpp:1: error: (-215:Assertion failed) in function")
        return real_search(rgb, params)

    monkeypatch.setitem(proposals_module.PROPOSAL_METHODS, "selective-search",
                        proposals_module.ProposalMethod("selective-search", search_that_asserts, ("mode",)))
    assert rcnn("proposals", scheduler="threads") == 0  # the patch reaches this process's threads only
    metrics = status_json(rcnn, capsys)["proposals"]["metrics"]
    assert failing_id in metrics["failed"] and "Assertion failed" in metrics["failed"][failing_id]
    assert metrics["failed_images"] >= 1


def test_unknown_override_is_a_one_line_error(rcnn, capsys):
    assert rcnn("proposals", "--set", "proposals.mdoe=x") == 2
    error = capsys.readouterr().err
    assert error.startswith("rcnn: error: --set proposals.mdoe") and error.count("\n") == 1


def test_missing_data_set_explains_how_to_make_one(rcnn, tmp_path, capsys):
    assert rcnn("proposals", data=tmp_path / "nowhere") == 2
    assert "rcnn data shapes" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_one_line_error(rcnn, capsys):
    assert rcnn("status", "--device", "cuda") == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
