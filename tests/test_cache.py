import os
import subprocess
import sys

from pipeline.engine.cache import StageCache, cache_key, sha256_of, temporary_path


def test_cache_key_ignores_dict_order_and_follows_values():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1, "b": [1, 2]}) != cache_key({"a": 1, "b": [2, 1]})


def test_commit_shard_moves_the_file_into_place_then_records_it(tmp_path):
    cache = StageCache(tmp_path, "stage", "key", ".txt")
    cache.prepare()
    temporary = temporary_path(cache.shard_path("00000"))
    temporary.write_text("payload")
    assert not cache.shard_done("00000")
    record = cache.commit_shard("00000", temporary, 0.0, 1.5, {})
    assert not temporary.exists() and cache.shard_path("00000").read_text() == "payload"
    assert cache.shard_done("00000") and cache.shard_record("00000") == record
    assert record["sha256"] == sha256_of(cache.shard_path("00000")) and record["bytes"] == 7


def test_prepare_removes_temporaries_and_keeps_finished_shards(tmp_path):
    cache = StageCache(tmp_path, "stage", "key", ".txt")
    cache.prepare()
    leftover = temporary_path(cache.shard_path("00001"))
    leftover.write_text("half written")
    cache.commit_shard("00000", _written(temporary_path(cache.shard_path("00000"))), 0.0, 0.0, {})
    cache.prepare()
    assert not leftover.exists() and cache.shard_done("00000")


def _written(path):
    path.write_text("done")
    return path


HOLD_LOCK = """
import sys, time
from pipeline.engine.cache import StageCache
cache = StageCache(sys.argv[1], "stage", "key")
with cache.lock():
    print("locked", flush=True)
    time.sleep(1.0)
    open(sys.argv[2], "w").write("finished")
"""


def test_a_second_run_waits_for_the_lock_and_sees_who_holds_it(tmp_path):
    finished = tmp_path / "holder-finished"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), str(finished)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cache = StageCache(tmp_path, "stage", "key")
        assert cache.holder_pid() == str(holder.pid)
        with cache.lock():
            assert finished.exists()  # acquired only once the holder was done
            assert cache.lock_path.read_text() == str(os.getpid())
        assert cache.holder_pid() is None
    finally:
        holder.kill()
        holder.wait()
