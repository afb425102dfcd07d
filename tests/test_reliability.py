"""What the cache, the data reader and the CLI promise when things go wrong (docs/cache.md: Reliability)."""
import json
import shutil
import subprocess
import sys

import pytest
from test_engine import REGISTRY as TOY_STAGES
from test_engine import make_ctx, run
from test_rcnn_pipeline import status
from tiny import options

from pipeline.cli import main
from pipeline.engine.cache import StageCache, sha256_of
from pipeline.engine.runner import plan_stages


# ---- a cache that cannot lie ---------------------------------------------------------------------------
def test_a_shard_whose_record_is_deleted_leaves_the_stage_partial_and_only_it_is_recomputed(shapes_root, tmp_path):
    _, plans = run(make_ctx(shapes_root, tmp_path))
    cache = plans["count"].cache
    cache.record_path("00001").unlink()
    kept = {shard: cache.record_path(shard).stat().st_mtime_ns for shard in ("00000", "00002")}
    plans = {plan.stage.name: plan for plan in plan_stages(["total"], TOY_STAGES, make_ctx(shapes_root, tmp_path))}
    assert plans["count"].state() == "partial"
    summaries, plans = run(make_ctx(shapes_root, tmp_path))
    assert summaries["count"]["computed"] and plans["count"].state() == "cached"
    assert {shard: cache.record_path(shard).stat().st_mtime_ns for shard in kept} == kept


def test_a_truncated_shard_is_found_by_its_size_and_recomputed(shapes_root, tmp_path):
    _, plans = run(make_ctx(shapes_root, tmp_path))
    cache = plans["count"].cache
    cache.shard_path("00002").write_text("")
    assert not cache.is_complete()
    assert cache.problems(["00000", "00001", "00002"], deep=False) == {
        "00002": f"{cache.shard_path('00002')}: 0 bytes, its record says 1"}
    summaries, plans = run(make_ctx(shapes_root, tmp_path))
    assert summaries["count"]["computed"] and plans["count"].cache.shard_path("00002").read_text() == "4"


def test_changed_contents_of_the_same_size_are_found_by_their_sha256(shapes_root, tmp_path):
    _, plans = run(make_ctx(shapes_root, tmp_path))
    cache = plans["count"].cache
    cache.shard_path("00001").write_text("7")  # was "2": same size, other bytes
    assert cache.is_complete()  # the cheap check cannot see it
    assert "its contents differ from its record (sha256)" in cache.problems(["00001"], deep=True)["00001"]
    assert run(make_ctx(shapes_root, tmp_path, offset=3))[1]["total"].cache.shard_path("00000").read_text() == "9"


@pytest.mark.slow
def test_corrupt_fine_tuned_weights_are_never_read_they_are_recomputed_first(tiny_run, tmp_path, capsys):
    data, original, reports = tiny_run
    cache = shutil.copytree(original, tmp_path / "cache")
    rows = status(data, cache, reports, capsys)
    weights = cache / "finetune" / rows["finetune"]["key"] / "00000.pt"
    expected = sha256_of(weights)
    corrupted = bytearray(weights.read_bytes())
    corrupted[5000:5064] = bytes(64)
    weights.write_bytes(bytes(corrupted))
    rows = status(data, cache, reports, capsys)
    assert rows["finetune"]["state"] == "partial" and "differ from its record" in rows["finetune"]["problems"][0]
    capsys.readouterr()
    assert main(["run", "--force", "svm", *options(data, cache, tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert "finetune                 computed" in out and "svm                      computed" in out
    assert sha256_of(weights) == expected  # retrained to the very same weights, then read
    assert status(data, cache, reports, capsys)["rcnn-evaluate"]["metrics"] == rows["rcnn-evaluate"]["metrics"]


def test_rcnn_verify_forgets_exactly_the_bad_shards(shapes_root, tmp_path, capsys):
    argv = ["--data", str(shapes_root), "--cache", str(tmp_path / "cache"), "--reports", str(tmp_path / "reports")]
    assert main(["proposals", *argv]) == 0
    (key_dir,) = [path for path in (tmp_path / "cache" / "proposals").iterdir() if path.is_dir()]
    shard = sorted(key_dir.glob("*.h5"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + bytes(10))
    capsys.readouterr()
    assert main(["verify", "proposals", *argv]) == 0
    out = capsys.readouterr().out
    assert f"{shard}: its contents differ from its record (sha256): forgotten" in out and "1 shards forgotten" in out
    assert not shard.exists() and not (key_dir / "manifest.json").exists()
    assert main(["proposals", *argv]) == 0 and (key_dir / "manifest.json").exists()
    assert main(["verify", *argv]) == 0 and "every shard matches its record" in capsys.readouterr().out
    assert (key_dir / "manifest.json").exists()  # what matches is left as it is


# ---- the data set -----------------------------------------------------------------------------------------
def test_a_split_id_that_leaves_the_data_folder_is_an_error_naming_file_and_line(rcnn, shapes_copy, capsys):
    split = shapes_copy / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + "../../x\n")
    capsys.readouterr()
    assert rcnn("proposals", data=shapes_copy) == 2
    error = capsys.readouterr().err
    lines = len(split.read_text().splitlines())
    assert error == (f"rcnn: error: {split}: line {lines}: '../../x' is not an image id (a file name without folders: "
                     f"no / or \\, not . or ..)\n")


def test_a_data_set_level_problem_does_not_suggest_skipping(rcnn, shapes_copy, capsys):
    (shapes_copy / "ImageSets" / "Main" / "test.txt").unlink()
    assert rcnn("proposals", data=shapes_copy) == 2
    error = capsys.readouterr().err
    assert "split file is missing" in error and "--on-bad-input" not in error


# ---- faults end in one line -------------------------------------------------------------------------------
def run_in_a_small_filesystem(tmp_path, command: str) -> subprocess.CompletedProcess:
    """Run a shell command in a private mount namespace with a 3 MiB tmpfs at tmp_path/small."""
    small = tmp_path / "small"
    small.mkdir()
    script = f"mount -t tmpfs -o size=3m tmpfs {small} && {command}"
    try:
        finished = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                                  capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed: a full disk cannot be made here")
    if "mount" in finished.stderr and "ermission" in finished.stderr or "unshare:" in finished.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {finished.stderr.strip()[:200]}")
    return finished


@pytest.mark.slow
def test_a_full_disk_is_one_line_with_exit_code_2_and_the_run_resumes_once_there_is_room(shapes_root, tmp_path):
    sets = ("--set pretrain.iterations=4 --set finetune.iterations=4 --set proposals.max_proposals=80 "
            "--set features.dtype=float32 --set features.compression=none")  # features larger than the 3 MiB disk
    rcnn = f"{sys.executable} -m pipeline.cli features --data {shapes_root} --reports {tmp_path}/reports {sets}"
    finished = run_in_a_small_filesystem(
        tmp_path, f"{rcnn} --cache {tmp_path}/small/cache; code=$?; cp -r {tmp_path}/small/cache {tmp_path}/kept; "
                  f"exit $code")
    assert finished.returncode == 2, finished.stderr[-2000:]
    (error,) = [line for line in finished.stderr.splitlines() if line.startswith("rcnn:")]
    assert "No space left on device (the disk is full" in error and f"{tmp_path}/small/cache/" in error
    assert "Traceback" not in finished.stderr
    resumed = subprocess.run(f"{rcnn} --cache {tmp_path}/kept", shell=True, capture_output=True, text=True)
    clean = subprocess.run(f"{rcnn} --cache {tmp_path}/clean", shell=True, capture_output=True, text=True)
    assert resumed.returncode == clean.returncode == 0
    for shard in sorted((tmp_path / "clean" / "features").glob("*/*.h5")):
        assert sha256_of(shard) == sha256_of(tmp_path / "kept" / "features" / shard.parent.name / shard.name)


# ---- the same inputs give the same bytes ----------------------------------------------------------------
@pytest.mark.slow
def test_two_runs_of_the_svm_stage_give_the_same_bytes(tiny_run, tmp_path, capsys):
    data, original, reports = tiny_run
    key = status(data, original, reports, capsys)["svm"]["key"]
    outputs = []
    for attempt in range(2):
        cache = shutil.copytree(original, tmp_path / f"cache{attempt}")
        assert main(["svm", "--force", "--scheduler", "threads:2", *options(data, cache, reports)]) == 0
        outputs.append({path.name: sha256_of(path) for path in sorted((cache / "svm" / key).glob("*.npz"))})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]  # two tasks of three classes, side by side


@pytest.mark.slow
def test_a_read_only_cache_is_one_line_naming_the_file(shapes_root, tmp_path):
    rcnn = f"{sys.executable} -m pipeline.cli proposals --data {shapes_root} --reports {tmp_path}/reports"
    finished = run_in_a_small_filesystem(
        tmp_path, f"mount -o remount,ro {tmp_path}/small && {rcnn} --cache {tmp_path}/small/cache")
    assert finished.returncode == 2, finished.stderr[-2000:]
    (error,) = [line for line in finished.stderr.splitlines() if line.startswith("rcnn:")]
    assert error.startswith(f"rcnn: error: {tmp_path}/small/cache") and "Read-only file system" in error
    assert "Traceback" not in finished.stderr


def test_status_names_no_running_process_for_a_finished_stage_whose_lock_is_held(rcnn, tmp_path, capsys):
    assert rcnn("proposals") == 0
    capsys.readouterr()
    assert rcnn("status", "--json") == 0
    proposals = next(r for r in json.loads(capsys.readouterr().out)["stages"] if r["stage"] == "proposals")
    with StageCache(tmp_path / "cache", "proposals", proposals["key"]).lock():  # a run that holds it to the end
        capsys.readouterr()
        assert rcnn("status", "--json") == 0
        held = next(r for r in json.loads(capsys.readouterr().out)["stages"] if r["stage"] == "proposals")
    assert held["state"] == "cached" and held["running_pid"] is None


# ---- records of another shape (whoever wrote them) count as missing --------------------------------------
def proposals_key_dir(cache):
    (key_dir,) = [path for path in (cache / "proposals").iterdir() if path.is_dir()]
    return key_dir


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"file": "00000.h5"}', "{not json"])
def test_a_shard_record_of_the_wrong_shape_is_partial_repaired_by_verify_and_recomputed(rcnn, tmp_path, capsys,
                                                                                        content):
    assert rcnn("proposals") == 0
    record = proposals_key_dir(tmp_path / "cache") / "00000.done.json"
    record.write_text(content)
    capsys.readouterr()
    assert rcnn("status", "--json") == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["stages"] if r["stage"] == "proposals")
    assert row["state"] == "partial" and str(record) in row["problems"][0]
    assert rcnn("verify", "proposals") == 0
    assert f"{record}: " in capsys.readouterr().out and not record.exists()
    record.write_text(content)
    assert rcnn("proposals") == 0  # without verify, the run itself recomputes it
    assert "proposals                computed" in capsys.readouterr().out and json.loads(record.read_text())["sha256"]


def test_a_manifest_of_the_wrong_shape_is_written_again_and_verify_forgets_it(rcnn, tmp_path, capsys, caplog):
    assert rcnn("proposals") == 0
    manifest = proposals_key_dir(tmp_path / "cache") / "manifest.json"
    manifest.write_text("[]")
    capsys.readouterr()
    assert rcnn("status") == 0 and "proposals                partial" in capsys.readouterr().out
    assert rcnn("verify", "proposals") == 0
    assert f"{manifest}: holds a JSON list, not an object: forgotten" in capsys.readouterr().out
    manifest.write_text("[]")
    assert rcnn("proposals") == 0 and isinstance(json.loads(manifest.read_text()), dict)
    assert f"{manifest}: holds a JSON list, not an object; written again" in caplog.text


def test_a_digest_memo_of_the_wrong_shape_is_ignored_with_a_warning(rcnn, tmp_path, capsys, caplog):
    assert rcnn("proposals") == 0
    memo = tmp_path / "cache" / ".data-identity.json"
    memo.write_text("[1]")
    capsys.readouterr()
    assert rcnn("status") == 0 and "proposals                cached" in capsys.readouterr().out
    assert f"{memo}: not a memo of file digests (damaged?); ignored" in caplog.text
    assert isinstance(json.loads(memo.read_text()), dict)  # written again


def test_a_shard_flipped_in_place_is_recomputed_by_the_next_run_not_reused(rcnn, tmp_path, capsys):
    assert rcnn("proposals") == 0
    shard = sorted(proposals_key_dir(tmp_path / "cache").glob("*.h5"))[0]
    flipped = bytearray(shard.read_bytes())
    flipped[-100] ^= 0xFF  # same size: only its sha256 tells
    shard.write_bytes(bytes(flipped))
    capsys.readouterr()
    assert rcnn("proposals") == 0 and "proposals                computed" in capsys.readouterr().out


def test_verify_refuses_a_stage_another_run_is_computing_in_one_line(rcnn, tmp_path, capsys):
    assert rcnn("proposals") == 0
    with StageCache(tmp_path / "cache", "proposals", proposals_key_dir(tmp_path / "cache").name).lock():
        capsys.readouterr()
        assert rcnn("verify", "proposals") == 2
    error = capsys.readouterr().err
    assert error.startswith("rcnn: error: ") and "being computed by another run (pid" in error
    assert len(error.splitlines()) == 1


# ---- the config is checked whole before anything runs ---------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("svm.C=.inf", "svm.C = inf: expected finite numbers (not inf or nan)"),
    ("finetune.lr=.nan", "finetune.lr = nan: expected finite numbers (not inf or nan)"),
    ("finetune.lr=3", "finetune.lr = 3.0: expected a number in (0, 1]"),
    ("backbone.input_size=1", "backbone.input_size 1: backbone small needs a multiple of 16, at least 16"),
    ("data.classes=[star, circle, star]", "data.classes: 'star' is listed more than once"),
    ("data.classes=[st/ar]", "data.classes: 'st/ar' holds a path separator (/ or \\)")])
def test_a_value_out_of_its_real_range_stops_the_command_before_anything_runs(rcnn, tmp_path, capsys, setting,
                                                                              message):
    assert rcnn("svm", "--set", setting) == 2
    assert capsys.readouterr().err == f"rcnn: error: config demo: {message}\n"
    assert not (tmp_path / "cache").exists()


def test_a_class_name_with_a_path_separator_in_an_annotation_is_one_line_naming_the_file(rcnn, shapes_copy,
                                                                                          capsys):
    annotation = next(path for path in sorted((shapes_copy / "Annotations").iterdir())
                      if "<name>star</name>" in path.read_text())
    annotation.write_text(annotation.read_text().replace("<name>star</name>", "<name>st/ar</name>", 1))
    assert rcnn("proposals", data=shapes_copy) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"rcnn: error: {annotation}: object ") and "class name 'st/ar' holds a path separator" \
        in error and len(error.splitlines()) == 1


def test_a_yaml_syntax_error_is_one_line_with_its_line_and_column(rcnn, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("data:\n  root: x\n   classes: []\n")
    assert rcnn("status", "--config", str(config)) == 2
    assert capsys.readouterr().err == (f"rcnn: error: {config}: not valid YAML (line 3, column 11: mapping values "
                                       f"are not allowed here)\n")


def test_a_split_id_with_a_space_is_an_error_naming_the_line_not_a_missing_annotation(rcnn, shapes_copy, capsys):
    split = shapes_copy / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + "my img\n")
    assert rcnn("proposals", data=shapes_copy) == 2
    lines = len(split.read_text().splitlines())
    assert capsys.readouterr().err == (f"rcnn: error: {split}: line {lines}: 'my img' is not an image id (ids hold "
                                       f"no spaces; a second column may only be 1, 0 or -1)\n")


@pytest.mark.slow
def test_a_full_disk_under_data_shapes_or_while_reports_are_copied_is_one_line_naming_a_file(shapes_root, tmp_path):
    shapes = f"{sys.executable} -m pipeline.cli data shapes --images 400 --out {tmp_path}/small/shapes"
    proposals = (f"{sys.executable} -m pipeline.cli proposals --data {shapes_root} --cache {tmp_path}/cache "
                 f"--reports {tmp_path}/small/reports")
    fill = f"head -c 3137536 /dev/zero > {tmp_path}/small/filler"  # leaves 8 kB: less than the report
    for command, written in ((shapes, f"{tmp_path}/small/.shapes"), (f"{fill} && {proposals}", f"{tmp_path}/small/")):
        finished = run_in_a_small_filesystem(tmp_path, command)
        assert finished.returncode == 2, finished.stderr[-2000:]
        (error,) = [line for line in finished.stderr.splitlines() if line.startswith("rcnn:")]
        assert error.startswith(f"rcnn: error: {written}") and "No space left on device" in error, error
        assert "Traceback" not in finished.stderr and "[(" not in error
        shutil.rmtree(tmp_path / "small")


@pytest.mark.slow
def test_status_reads_a_read_only_cache(shapes_root, tmp_path):
    rcnn = f"{sys.executable} -m pipeline.cli"
    where = f"--data {shapes_root} --reports {tmp_path}/reports --cache {tmp_path}/small/cache"
    finished = run_in_a_small_filesystem(
        tmp_path, f"{rcnn} proposals {where} && mount -o remount,ro {tmp_path}/small && {rcnn} status {where}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "proposals                cached" in finished.stdout
