"""What `rcnn status` shows of a planned stage, and what `rcnn verify` checks and repairs."""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.errors import DataSetError
from pipeline.engine.runner import RunContext, StagePlan, plan_stages
from pipeline.engine.stage import Stage


def plan_each(targets: list[str], registry: dict[str, Stage], run: RunContext) -> tuple[list[StagePlan], list[dict]]:
    """Every stage the targets need, each target planned apart, in registry order; a target the data set cannot
    feed (the FCN without segmentation masks) gets an "n/a" row (second list) instead of stopping the rest."""
    plans: dict[str, StagePlan] = {}
    unavailable = []
    for target in targets:
        try:
            plans.update({plan.stage.name: plan for plan in plan_stages([target], registry, run)
                          if plan.stage.name not in plans})
        except DataSetError as error:
            unavailable.append({"stage": target, "state": "n/a", "reason": str(error)})
    return [plans[name] for name in registry if name in plans], unavailable


def status_row(plan: StagePlan, memo: Path | None) -> dict:
    """The stage's state (cached | partial | running | stale | missing), key, size, shards and, when cached,
    its metrics. A recorded shard whose file or record differs from what was recorded (sha256 remembered in `memo`
    by size and mtime) is listed in its problems, and makes a cached output partial: what `rcnn run` would recompute
    and `rcnn verify` forgets. With memo None, only the cheap check: each recorded shard's record and file there, of
    the size recorded (the report page, rebuilt after every run, does not hash what the run just wrote)."""
    state = plan.state()
    problems = {}
    if state in ("cached", "partial"):
        problems = plan.problems(memo) if memo else plan.cache.problems(
            [shard.id for shard in plan.shards if plan.cache.shard_done(shard.id)], deep=False)
    state = "partial" if problems and state == "cached" else state
    return {"stage": plan.stage.name, "state": state, "key": plan.key, "size_bytes": plan.cache.size_bytes(),
            "shards_done": len(plan.shards) - len(plan.missing_shards), "shards": len(plan.shards),
            "stale_keys": plan.cache.other_keys(),
            "running_pid": plan.cache.holder_pid() if state != "cached" else None,
            "metrics": plan.cache.manifest().get("metrics", {}) if state == "cached" else {},
            "problems": list(problems.values())}


def verify(plan: StagePlan) -> tuple[int, dict[str, str], str | None]:
    """Hash every recorded shard afresh and compare it with its record; forget the shards that differ or
    whose record has the wrong shape, and a manifest of the wrong shape (the next run recomputes them).
    Returns how many shards are recorded as done, the forgotten shards' problems and the manifest's problem.
    Refuses (CacheBusy) while another run computes the stage."""
    done = [shard.id for shard in plan.shards if plan.cache.shard_done(shard.id)]
    with plan.cache.lock(wait=False):
        forgotten = plan.cache.problems(done, deep=True)
        plan.cache.invalidate(forgotten)
        manifest_problem = plan.cache.manifest_problem()
        if manifest_problem:
            plan.cache.manifest_path.unlink()
    return len(done), forgotten, manifest_problem
