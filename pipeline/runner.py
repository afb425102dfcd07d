"""Plan and run stages: cache keys, what is done, locks, the Dask graph, and the reports.

The key of a stage hashes its name, version, params, key extras, the keys of its inputs and the data
set's identity, so changing a param re-runs that stage and those downstream of it, nothing upstream.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import graph
from pipeline.cache import StageCache, cache_key, temporary_path
from pipeline.errors import ConfigError
from pipeline.stage import RunContext, Shard, Stage
from pipeline.timing import describe_hardware, union_seconds

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    stage: Stage
    key: str
    description: dict
    cache: StageCache
    shards: list[Shard]
    inputs: dict[str, StageCache]

    @property
    def missing_shards(self) -> list[Shard]:
        return [shard for shard in self.shards if not self.cache.shard_done(shard.id)]

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
        for upstream in registry[name].input_stages(config):
            visit(upstream, path + (name,))
        if name not in order:
            order.append(name)

    for target in targets:
        visit(target, ())
    return order


def plan_stages(targets: list[str], registry: dict[str, Stage], ctx: RunContext) -> list[StagePlan]:
    plans: dict[str, StagePlan] = {}
    for name in upstream_order(targets, registry, ctx.config):
        stage = registry[name]
        inputs = stage.input_stages(ctx.config)
        description = {
            "stage": name, "version": stage.version, "params": stage.params(ctx.config),
            "extras": stage.key_extras(ctx), "data": ctx.data_identity,
            "inputs": {upstream: plans[upstream].key for upstream in inputs},
        }
        key = cache_key(description)
        plans[name] = StagePlan(stage, key, description, StageCache(ctx.cache_root, name, key, stage.shard_suffix),
                                stage.shards(ctx), {upstream: plans[upstream].cache for upstream in inputs})
    return list(plans.values())


def run_stages(plans: list[StagePlan], ctx: RunContext, scheduler: str, force: set[str] = frozenset()) -> list[dict]:
    """Compute what is not cached (and what `force` names) through Dask; publish every report.

    Returns one summary per stage: name, key, whether it was computed, its manifest's metrics.
    """
    computed: list[StagePlan] = []
    with ExitStack() as locks:
        for plan in plans:
            name = plan.stage.name
            if plan.cache.is_complete() and name not in force:
                log.info("%s: cached (%s)", name, plan.key)
                continue
            locks.enter_context(plan.cache.lock())
            if name in force:
                plan.cache.clear()
            elif plan.cache.is_complete():  # another run finished it while we waited for the lock
                continue
            plan.cache.prepare()
            done = len(plan.shards) - len(plan.missing_shards)
            log.info("%s: computing %s (%d of %d shards already done)", name, plan.key, done, len(plan.shards))
            computed.append(plan)
        if computed:
            resources = {name for plan in computed for name in plan.stage.resources(ctx)}
            graph.execute(graph.build(computed, ctx, finalize_stage), scheduler, resources)
    for plan in plans:
        publish_report(plan, ctx.reports_root)
    return [{"stage": plan.stage.name, "key": plan.key, "computed": plan in computed,
             "metrics": plan.cache.manifest().get("metrics", {})} for plan in plans]


def finalize_stage(plan: StagePlan, ctx: RunContext) -> str:
    """Reduce the shard records into metrics and a report, then write the manifest (last)."""
    started_at, started = time.time(), time.perf_counter()
    records = {shard.id: plan.cache.shard_record(shard.id) for shard in plan.shards}
    shutil.rmtree(plan.cache.report_dir, ignore_errors=True)
    plan.cache.report_dir.mkdir(parents=True)
    metrics = plan.stage.reduce(ctx, plan.cache, records, plan.inputs)
    reduce_seconds = time.perf_counter() - started
    shard_seconds = sum(record["seconds"] for record in records.values())
    plan.cache.write_manifest({
        "stage": plan.stage.name, "key": plan.key, "description": plan.description,
        "shards": records, "metrics": metrics,
        "timings": {"shard_s": shard_seconds, "reduce_s": reduce_seconds, "compute_s": shard_seconds + reduce_seconds,
                    "reduce_started": started_at,
                    "wall_s": union_seconds([(r["started"], r["seconds"]) for r in records.values()]
                                            + [(started_at, reduce_seconds)])},
        "hardware": describe_hardware(ctx.device) if plan.stage.runs_on_device else describe_hardware("cpu"),
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
    shutil.copytree(plan.cache.report_dir, staging)
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
