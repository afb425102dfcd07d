"""A run stopped at any point, by a kill, Ctrl-C or SIGTERM, leaves a cache the next run resumes from to the bytes
of an uninterrupted run; and no stage's first import can race another's (docs/cache.md: Reliability)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kill_at import run_killed_at
from tiny import options

from pipeline.engine.cache import RECORD_SUFFIX

pytestmark = pytest.mark.slow

# the first stages of R-CNN, shortened: proposals and pretrain run side by side, then finetune reads both
FIRST_STAGES = ["finetune", "--scheduler", "threads:2"]
RECORDER = """
import importlib.abc, sys, threading
first_imported_off_main = []
class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in sys.modules and threading.current_thread() is not threading.main_thread():
            first_imported_off_main.append(name)
import pipeline.cli
sys.meta_path.insert(0, Recorder())
code = pipeline.cli.main(sys.argv[1:])
print("first imported off the main thread:", *first_imported_off_main)
sys.exit(code)
"""
# ours, and the libraries our modules import, whose modules import each other: a first import in two threads at
# once can find one half done (torchvision.ops did: ImportError, partially initialized module). torch itself loads
# some of its own parts on first use (torch.save: torch.utils.serialization), as PIL its plugins and matplotlib its
# backend: inside those libraries, not ours to order.
GUARDED = ("pipeline", "stages", "torchvision", "sklearn", "cv2", "h5py", "dask", "distributed", "scipy")


def test_no_module_of_ours_or_torchvision_is_first_imported_while_stages_run_side_by_side(shapes_root, tmp_path):
    """Every import is at the top of its module and the CLI imports every stage before a graph starts, so the
    shard tasks running in threads never import one of GUARDED's modules for the first time."""
    finished = subprocess.run([sys.executable, "-c", RECORDER, *FIRST_STAGES,
                               *options(shapes_root, tmp_path / "cache", tmp_path / "reports")],
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    imported = finished.stdout.splitlines()[-1].split(":")[1].split()
    assert not [name for name in imported if name.split(".")[0] in GUARDED], imported


def shard_digests(cache: Path) -> dict[str, str]:
    """stage/key/shard id -> the sha256 its record holds, for every recorded shard of the cache."""
    return {str(record.relative_to(cache)): json.loads(record.read_text())["sha256"]
            for record in sorted(cache.glob(f"*/*/*{RECORD_SUFFIX}"))}


@pytest.fixture(scope="module")
def clean_first_stages(shapes_root, tmp_path_factory):
    """The first stages run once, uninterrupted: the bytes every interrupted run must end with."""
    work = tmp_path_factory.mktemp("clean")
    finished = subprocess.run([sys.executable, "-m", "pipeline.cli", *FIRST_STAGES,
                               *options(shapes_root, work / "cache", work / "reports")], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return shard_digests(work / "cache")


@pytest.mark.parametrize("stage", ["proposals", "pretrain"])
@pytest.mark.parametrize("event", ["finalize", "manifest", "written"])
def test_a_kill_between_the_last_record_and_the_manifest_or_between_stages_resumes_to_the_same_bytes(
        shapes_root, tmp_path, clean_first_stages, stage, event):
    """finalize: every shard recorded, no manifest; manifest: the report written, not the manifest; written: the
    manifest written, the next stage not started. The next run must not wedge (it once died on an import race)."""
    argv = [*FIRST_STAGES, *options(shapes_root, tmp_path / "cache", tmp_path / "reports")]
    run_killed_at(event, stage, 1, argv)
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert shard_digests(tmp_path / "cache") == clean_first_stages


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_stops_it_keeps_its_iterations_and_the_rerun_ends_with_the_same_weights(
        shapes_root, tmp_path, signal_number, exit_code):
    def argv(cache):  # options() sets the tiny runs' pretraining: longer here, so that it is stopped mid-way
        return ["pretrain", *options(shapes_root, cache, tmp_path / "reports"), "--set", "pretrain.iterations=150",
                "--set", "pretrain.checkpoint_every=10", "--set", "pretrain.batch_size=32"]
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv(tmp_path / "cache")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "cache" / "pretrain"
    while not list(checkpoints.glob("*/00000.checkpoint")):  # training is under way: it has checkpointed once
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal_number)
    stderr = process.communicate(timeout=60)[1]  # stops, rather than training on to its end
    assert process.returncode == exit_code
    assert stderr.splitlines()[-1] == (f"rcnn: stopped ({signal.Signals(signal_number).name}); finished shards are "
                                       f"kept: run the same command again to resume")
    (checkpoint,) = checkpoints.glob("*/00000.checkpoint")
    stopped_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 10 <= stopped_at < 150  # the checkpoint written where it stopped (or the last periodic one)
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv(tmp_path / "cache")], capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and f"resuming from iteration {stopped_at}" in resumed.stderr
    uninterrupted = tmp_path / "uninterrupted"
    clean = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv(uninterrupted)], capture_output=True)
    assert clean.returncode == 0
    (weights,) = checkpoints.glob("*/00000.pt")
    expected = torch.load(uninterrupted / "pretrain" / weights.parent.name / "00000.pt", weights_only=True)
    resumed_weights = torch.load(weights, weights_only=True)
    assert resumed_weights["losses"] == expected["losses"]
    assert all(torch.equal(tensor, resumed_weights["model"][name]) for name, tensor in expected["model"].items())
