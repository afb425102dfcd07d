"""The Dask graph: one task per (stage, missing shard), one finalize task per stage.

Edges: a stage's finalize waits for its shards; a stage's shards wait for the finalize of every
upstream stage being computed in the same run. The same graph runs on the threaded scheduler
(`threads` or `threads:N`), on a dask.distributed LocalCluster of N worker processes (`local:N`) or on
an existing cluster (`tcp://host:port`; its workers must see the same cache directory).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import dask
from dask.callbacks import Callback
from distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from pipeline.engine.cache import temporary_path
from pipeline.engine.errors import ConfigError
from pipeline.engine.interrupt import check_stop
from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.engine.stage import ShardOutput

log = logging.getLogger(__name__)


def build(plans, finalize) -> list:
    """Delayed tasks for every missing shard and every stage's finalize (`finalize(plan)`)."""
    finals, tasks = {}, []
    for plan in plans:
        name = plan.stage.name
        upstream = [finals[input_name] for input_name in plan.inputs if input_name in finals]
        resources = plan.stage.resources(plan.context)
        with dask.annotate(resources=resources) if resources else nullcontext():
            shard_tasks = [dask.delayed(run_shard_task, pure=False)(plan, shard, *upstream,
                                                                   dask_key_name=f"{name}:shard:{shard.id}")
                           for shard in plan.missing_shards]
        finals[name] = dask.delayed(finalize_task, pure=False)(finalize, plan, *shard_tasks, *upstream,
                                                              dask_key_name=f"{name}:finalize")
        tasks += shard_tasks + [finals[name]]
    return tasks


_EXCLUSIVE_LOCK = threading.Lock()  # shards of stages that must not share this process (Stage.exclusive)


def run_shard_task(plan, shard, *_upstream_done) -> str:
    """Run one shard into a temporary file, then commit it and its record (none is started after a stop)."""
    check_stop()
    use_tensor_friendly_malloc()
    with _EXCLUSIVE_LOCK if plan.stage.exclusive else nullcontext():
        temporary = temporary_path(plan.cache.shard_path(shard.id))
        started_at, started = time.time(), time.perf_counter()
        metrics = plan.stage.run_shard(plan.context, shard, plan.inputs,
                                       ShardOutput(temporary, plan.cache.checkpoint_path(shard.id)))
        plan.cache.commit_shard(shard.id, temporary, started_at, time.perf_counter() - started, metrics)
    return shard.id


def finalize_task(finalize, plan, *_shards_done) -> str:
    check_stop()
    return finalize(plan)


def execute(tasks: list, scheduler: str, resources: set[str] = frozenset()) -> None:
    """Run the tasks on the named scheduler, with one progress bar per stage.

    `resources` names the dask.distributed resources some tasks ask for (e.g. "GPU"): a LocalCluster's
    workers are given one of each; an existing cluster must have a worker offering each, else the
    tasks would wait forever, so that is an error up front.
    """
    kind, workers_or_address = parse_scheduler(scheduler)
    progress = StageProgress(tasks)
    try:
        if kind == "threads":
            # a pool of our own, whose end waits for the shards still running when one fails: they finish
            # and are committed (or fail) before the error reaches the caller, so no half-written file remains
            with ThreadPoolExecutor(workers_or_address) as pool, ProgressCallback(progress):
                dask.compute(*tasks, scheduler="threads", pool=pool)
            return
        with dask_client(kind, workers_or_address, resources) as client:
            futures = client.compute(tasks)
            try:
                for future in as_completed(futures):
                    future.result()  # re-raises a task's exception here
                    progress.done(future.key)
            except BaseException:  # an error or a stop: no task of this run starts on the cluster afterwards
                client.cancel(futures)
                raise
    finally:
        progress.close()


def parse_scheduler(spec: str) -> tuple[str, int | str]:
    """('threads', N), ('local', N) or ('tcp', address); a ConfigError for anything else."""
    if spec.startswith("tcp://"):
        return "tcp", spec
    kind, _, count = spec.partition(":")
    if kind == "threads" and not count:
        return kind, os.cpu_count() or 1
    if kind in ("threads", "local") and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise ConfigError(f"--scheduler {spec!r}: expected threads, threads:N, local:N (N >= 1) or tcp://host:port")


@contextmanager
def dask_client(kind: str, workers_or_address: int | str, resources: set[str] = frozenset()):
    """A dask.distributed Client on a new LocalCluster ('local') or an existing cluster ('tcp')."""
    if kind == "local":
        environment = dict(os.environ)  # LocalCluster sets OMP_NUM_THREADS=1 etc. here and leaves them set
        try:
            with LocalCluster(n_workers=workers_or_address, threads_per_worker=1, processes=True,
                              resources={name: 1 for name in resources}, dashboard_address=None,
                              silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                yield client
        finally:
            os.environ.clear()
            os.environ.update(environment)
        return
    try:
        client = Client(workers_or_address, timeout="20s")
    except OSError as exc:
        raise ConfigError(f"--scheduler {workers_or_address}: cannot reach the dask scheduler ({exc})") from None
    with client:
        offered = {name for worker in client.scheduler_info()["workers"].values()
                   for name in worker.get("resources", {})}
        missing = sorted(set(resources) - offered)
        if missing:
            raise ConfigError(f"--scheduler {workers_or_address}: no worker offers the {missing[0]} resource; "
                              f"start one with `dask worker {workers_or_address} --resources {missing[0]}=1`")
        yield client


class StageProgress:
    """A tqdm bar per stage, counting its shards (shown only on a terminal)."""

    def __init__(self, tasks: list):
        totals: dict[str, int] = {}
        for task in tasks:
            stage, _, kind = task.key.partition(":")
            totals[stage] = totals.get(stage, 0) + kind.startswith("shard:")
        self.bars = {stage: tqdm(total=total, desc=stage, unit="shard", disable=None, leave=True)
                     for stage, total in totals.items()}

    def done(self, key) -> None:
        stage, _, kind = str(key).partition(":")
        if kind.startswith("shard:") and stage in self.bars:
            self.bars[stage].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class ProgressCallback(Callback):
    """Feeds the threaded scheduler's finished tasks to a StageProgress."""

    def __init__(self, progress: StageProgress):
        super().__init__()
        self.progress = progress

    def _posttask(self, key, result, dsk, state, worker_id):
        self.progress.done(key)
