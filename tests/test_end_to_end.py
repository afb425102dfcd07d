"""Slow end-to-end checks: a SIGKILLed run resumes to the same result, a real LocalCluster gives the
same proposals as threads, and the demo preset reaches its recall on 200 generated images."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from distributed import Client
from kill_at import run_killed_at

from pipeline.cli import main
from pipeline.data.shapes import write_shapes
from pipeline.engine.cache import StageCache
from pipeline.engine.graph import dask_client
from pipeline.proposals import read_proposals

pytestmark = pytest.mark.slow


def only_key_dir(cache_root):
    (key_dir,) = [path for path in (cache_root / "proposals").iterdir() if path.is_dir()]
    return key_dir


def proposals_in(cache_root):
    key_dir = only_key_dir(cache_root)
    return key_dir.name, read_proposals(StageCache(cache_root, "proposals", key_dir.name))


def assert_same_proposals(first, second):
    assert first[0] == second[0]  # same cache key
    assert first[1].keys() == second[1].keys()
    assert all(np.array_equal(first[1][image_id], second[1][image_id]) for image_id in first[1])


def test_sigkilled_run_resumes_and_equals_an_uninterrupted_run(shapes_root, tmp_path):
    options = ["--data", str(shapes_root), "--reports", str(tmp_path / "reports"),
               "--set", "proposals.images_per_shard=1"]
    killed_cache = tmp_path / "killed"
    run_killed_at("record", "proposals", 4, ["proposals", "--cache", str(killed_cache), "--scheduler", "threads:1",
                                             *options])

    key_dir = only_key_dir(killed_cache)
    done_before = {path.name: path.stat().st_mtime_ns for path in key_dir.glob("*.done.json")}
    assert not (key_dir / "manifest.json").exists() and 4 <= len(done_before) < 16
    for shard_file in key_dir.glob("*.h5"):  # whatever carries a final name is a complete HDF5 file
        with h5py.File(shard_file, "r") as opened:
            assert len(opened.keys()) == 1

    assert main(["proposals", "--cache", str(killed_cache), *options]) == 0
    assert {name: (key_dir / name).stat().st_mtime_ns for name in done_before} == done_before  # not redone
    assert not list(key_dir.glob(".*tmp-*")) and (key_dir / "manifest.json").exists()

    assert main(["proposals", "--cache", str(tmp_path / "clean"), *options]) == 0
    assert_same_proposals(proposals_in(killed_cache), proposals_in(tmp_path / "clean"))


def test_local_cluster_gives_the_same_proposals_as_threads(rcnn, tmp_path):
    assert rcnn("proposals", "--scheduler", "local:2", cache=tmp_path / "distributed") == 0
    assert rcnn("proposals", "--scheduler", "threads", cache=tmp_path / "threads") == 0
    assert_same_proposals(proposals_in(tmp_path / "distributed"), proposals_in(tmp_path / "threads"))


def test_local_cluster_leaves_the_environment_as_it_found_it():
    before = dict(os.environ)
    with dask_client("local", 1):
        pass
    assert dict(os.environ) == before


def test_demo_preset_recall_on_200_images(tmp_path, capsys):
    write_shapes(tmp_path / "shapes", images=200, seed=0)
    options = ["--data", str(tmp_path / "shapes"), "--cache", str(tmp_path / "cache"),
               "--reports", str(tmp_path / "reports")]
    assert main(["proposals", *options]) == 0
    _, proposals = proposals_in(tmp_path / "cache")
    manifest = StageCache(tmp_path / "cache", "proposals", only_key_dir(tmp_path / "cache").name).manifest()
    assert len(proposals) == 200 and manifest["metrics"]["recall@0.5"] >= 0.9
    capsys.readouterr()
    assert main(["proposals", *options]) == 0
    assert "cached" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cluster_that_loses_a_worker_mid_run_finishes_with_the_threads_result(shapes_root, tmp_path):
    """`dask scheduler` and two `dask worker --nthreads 1` on 127.0.0.1; one worker is SIGKILLed once the
    proposals stage has finished some shards; the run still ends well, with the threads run's proposals."""
    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    options = ["--data", str(shapes_root), "--reports", str(tmp_path / "reports"),
               "--set", "proposals.images_per_shard=1"]
    processes = []
    try:
        processes.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                           address.rsplit(":", 1)[1], "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        workers = [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
        processes += workers
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "proposals", "--scheduler", address,
                                "--cache", str(tmp_path / "cluster"), *options], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        processes.append(run)
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "cluster").glob("proposals/*/*.done.json"))) < 3:
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before a worker could be killed"
            time.sleep(0.05)
        os.kill(workers[0].pid, signal.SIGKILL)
        _, errors = run.communicate(timeout=300)
        assert run.returncode == 0, errors[-2000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    assert main(["proposals", "--scheduler", "threads", "--cache", str(tmp_path / "threads"), *options]) == 0
    assert_same_proposals(proposals_in(tmp_path / "cluster"), proposals_in(tmp_path / "threads"))
