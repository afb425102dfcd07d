"""Plan and run stages: cache keys, what is done, locks, the Dask graph, and the reports.

The key of a stage hashes its name, version, params, key extras, the keys of its inputs, the data
set's identity and its shard layout (every shard's id and items), so changing a param re-runs that
stage and those downstream of it, nothing upstream, and a shard file always holds what its id says.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from pipeline.engine import graph
from pipeline.engine.cache import StageCache, cache_key, temporary_path
from pipeline.engine.config import without_neutral_options
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import DataSet, Shard, Stage, StageContext, describe_hardware, freeze, resolve_device, thaw

log = logging.getLogger(__name__)
VERIFIED = ".verified.json"  # the sha256 of shard files, by path, size and mtime (pipeline.engine.cache.file_digests)


@dataclass
class RunContext:
    """One run: the whole config, the data set, and where outputs and reports go. Only the engine and the
    CLI hold it; each stage is handed its own StageContext."""
    config: dict
    dataset: DataSet
    cache_root: Path
    reports_root: Path

    @property
    def splits(self) -> dict[str, str]:
        data = self.config["data"]
        return {"train": data["train_split"], "test": data["test_split"]}

    @cached_property
    def device(self) -> str:
        return resolve_device(self.config.get("device", "auto"))

    @cached_property
    def data_identity(self) -> dict:
        """The data set's content digest, and which split plays which role (swapping them changes results)."""
        identity = self.dataset.identity(list(dict.fromkeys(self.splits.values())),
                                         self.cache_root / ".data-identity.json")
        return {**identity, "splits": self.splits}

    def stage_context(self, stage: Stage) -> StageContext:
        return StageContext(freeze(stage.params(self.config)), self.dataset, self.splits["train"],
                            self.splits["test"], self.config.get("device", "auto"), self.config["torch_threads"])


@dataclass
class StagePlan:
    stage: Stage
    key: str
    description: dict
    cache: StageCache
    shards: list[Shard]
    inputs: dict[str, StageCache]
    context: StageContext

    @property
    def missing_shards(self) -> list[Shard]:
        return [shard for shard in self.shards if not self.cache.shard_done(shard.id)]

    def problems(self, memo: Path) -> dict[str, str]:
        """shard id -> what is wrong with its record or file, for the shards recorded as done (contents
        compared by sha256, remembered in `memo` by size and mtime: pipeline.engine.cache.file_digests)."""
        done = [shard.id for shard in self.shards if self.cache.shard_done(shard.id)]
        return self.cache.problems(done, deep=True, memo=memo)

    def state(self) -> str:
        """cached | running | partial | stale | missing, as `rcnn status` shows it."""
        if self.cache.is_complete():
            return "cached"
        if self.cache.holder_pid():
            return "running"
        if self.cache.dir.is_dir() and len(self.missing_shards) < len(self.shards):
            return "partial"
        return "stale" if self.cache.other_keys() else "missing"


def upstream_order(targets: list[str], registry: dict[str, Stage], config: dict) -> list[str]:
    """The targets and every stage they read from, each after its inputs."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in registry:
            raise ConfigError(f"unknown stage {name!r} (stages: {', '.join(registry)})")
        if name in path:
            raise ConfigError(f"stage inputs form a cycle: {' -> '.join(path + (name,))}")
        for upstream in registry[name].input_stages(freeze(registry[name].params(config))):
            visit(upstream, path + (name,))
        if name not in order:
            order.append(name)

    for target in targets:
        visit(target, ())
    return order


def plan_stages(targets: list[str], registry: dict[str, Stage], run: RunContext) -> list[StagePlan]:
    """Each target's plan after those of the stages it reads: key, cache, shards, inputs and context."""
    plans: dict[str, StagePlan] = {}
    key_config = without_neutral_options(run.config)  # options at their neutral value are in no key
    for name in upstream_order(targets, registry, run.config):
        stage = registry[name]
        ctx = run.stage_context(stage)
        inputs = stage.input_stages(ctx.params)
        shards = stage.shards(ctx)
        description = {
            "stage": name, "version": stage.version, "params": thaw(freeze(stage.params(key_config))),
            "extras": stage.key_extras(ctx), "data": run.data_identity if stage.reads_data_set else None,
            "inputs": {upstream: plans[upstream].key for upstream in inputs},
            "shards": cache_key({shard.id: list(shard.items) for shard in shards}),
        }
        key = cache_key(description)
        plans[name] = StagePlan(stage, key, description, StageCache(run.cache_root, name, key, stage.shard_suffix),
                                shards, {upstream: plans[upstream].cache for upstream in inputs}, ctx)
    return list(plans.values())


def run_stages(plans: list[StagePlan], run: RunContext, scheduler: str, force: set[str] = frozenset()) -> list[dict]:
    """Compute what is not cached (and what `force` names) through Dask; publish every report.

    A cached output is first checked against its records as `rcnn status` checks it (sha256, remembered by
    size and mtime): shards that differ, and records or a manifest of the wrong shape, are forgotten and
    recomputed with a warning, never reused. Returns one summary per stage: name, key, whether it was
    computed, its manifest's metrics.
    """
    memo, computed = run.cache_root / VERIFIED, []
    with ExitStack() as locks:
        for plan in plans:
            name = plan.stage.name
            if name not in force and plan.cache.is_complete() and not plan.problems(memo):
                log.info("%s: cached (%s)", name, plan.key)
                continue
            locks.enter_context(plan.cache.lock())
            if name in force:
                plan.cache.clear()
            elif plan.cache.is_complete() and not plan.problems(memo):  # another run finished it meanwhile
                continue
            plan.cache.prepare()
            forget(plan, plan.problems(memo))
            done = len(plan.shards) - len(plan.missing_shards)
            log.info("%s: computing %s (%d of %d shards already done)", name, plan.key, done, len(plan.shards))
            computed.append(plan)
        if computed:
            resources = {name for plan in computed for name in plan.stage.resources(plan.context)}
            graph.execute(graph.build(computed, finalize_stage), scheduler, resources)
    for plan in plans:
        publish_report(plan, run.reports_root)
    return [{"stage": plan.stage.name, "key": plan.key, "computed": plan in computed,
             "metrics": plan.cache.manifest().get("metrics", {})} for plan in plans]


def run_in_turn(targets: list[str], registry: dict[str, Stage], run: RunContext, scheduler: str,
                force_of: Callable[[set[str]], set[str]]) -> Iterator[tuple[str, list[dict]]]:
    """Plan and run each target with what it reads, one after another, so that no two targets' stages share
    the machine (the timing table's training times); `force_of(stage names of a target's plans)` names those
    to recompute. Yields each target with its run's summaries as soon as it is done."""
    for target in targets:
        plans = plan_stages([target], registry, run)
        yield target, run_stages(plans, run, scheduler, force_of({plan.stage.name for plan in plans}))


def forget(plan: StagePlan, problems: dict[str, str]) -> None:
    """Forget the shards these problems name (and a manifest of the wrong shape), each with a warning."""
    manifest_problem = plan.cache.manifest_problem()
    if manifest_problem:
        log.warning("%s: %s; written again", plan.stage.name, manifest_problem)
        plan.cache.manifest_path.unlink()
    for problem in problems.values():
        log.warning("%s: %s; recomputing that shard", plan.stage.name, problem)
    plan.cache.invalidate(problems)


def finalize_stage(plan: StagePlan) -> str:
    """Reduce the shard records into metrics and a report, then write the manifest (last)."""
    started_at, started = time.time(), time.perf_counter()
    records = {shard.id: plan.cache.shard_record(shard.id) for shard in plan.shards}
    shutil.rmtree(plan.cache.report_dir, ignore_errors=True)
    plan.cache.report_dir.mkdir(parents=True)
    metrics = plan.stage.reduce(plan.context, plan.cache, records, plan.inputs)
    reduce_seconds = time.perf_counter() - started
    shard_seconds = sum(record["seconds"] for record in records.values())
    plan.cache.write_manifest({
        "stage": plan.stage.name, "key": plan.key, "description": plan.description,
        "shards": records, "metrics": metrics,
        "timings": {"shard_s": shard_seconds, "reduce_s": reduce_seconds, "compute_s": shard_seconds + reduce_seconds,
                    "reduce_started": started_at,
                    "wall_s": union_seconds([(r["started"], r["seconds"]) for r in records.values()]
                                            + [(started_at, reduce_seconds)])},
        "hardware": describe_hardware(plan.context.device if plan.stage.runs_on_device else "cpu"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return plan.key


def publish_report(plan: StagePlan, reports_root: Path) -> None:
    """Copy the stage's cached report to `<reports>/<stage>/`, replacing the previous one."""
    if not plan.cache.report_dir.is_dir():
        return
    destination = reports_root / plan.stage.name
    reports_root.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(destination)
    try:
        copy_tree(plan.cache.report_dir, staging)
        plan.stage.report_beside(staging, outputs_on_the_same_data(plan))
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def outputs_on_the_same_data(plan: StagePlan) -> list[dict]:
    """The manifests of this stage's complete outputs computed on the same data (this one first)."""
    manifests = [plan.cache.manifest()]
    for key in plan.cache.other_keys():
        try:
            manifest = StageCache(plan.cache.root, plan.stage.name, key).manifest()
        except (OSError, ValueError):
            continue
        if manifest["description"].get("data") == plan.description["data"]:
            manifests.append(manifest)
    return manifests


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a folder's files; the first failure is an OSError naming the file written (shutil.copytree would
    gather every failure into one shutil.Error, a list, and shutil names the source of a copy on a full disk)."""
    destination.mkdir()
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir()
            continue
        try:
            shutil.copyfile(path, target)
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(target)) from None


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, seconds) intervals."""
    total, reach = 0.0, float("-inf")
    for start, seconds in sorted(intervals):
        end = start + seconds
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
