"""The stage engine on two toy stages: keys, reuse, resume, force, failures, states."""
import shutil

import pytest

from pipeline.data.voc import VOCDataset
from pipeline.engine.errors import ConfigError
from pipeline.engine.graph import parse_scheduler
from pipeline.engine.runner import RunContext, plan_stages, run_stages, upstream_order
from pipeline.engine.stage import Shard, Stage


class Count(Stage):
    """Three shards, each writing item * factor."""
    name, shard_suffix = "count", ".txt"

    def shards(self, ctx):
        return [Shard(f"{item:05d}", (item,)) for item in range(3)]

    def run_shard(self, ctx, shard, inputs, out):
        if shard.items[0] == ctx.params.get("fail_on"):
            raise RuntimeError("boom")
        value = shard.items[0] * ctx.params["factor"]
        out.path.write_text(str(value))
        return {"value": value}

    def reduce(self, ctx, cache, records, inputs):
        return {"total": sum(record["metrics"]["value"] for record in records.values())}


class Total(Stage):
    """One shard: the sum of count's shard files plus an offset."""
    name, inputs, shard_suffix = "total", ("count",), ".txt"

    def shards(self, ctx):
        return [Shard("00000", ())]

    def run_shard(self, ctx, shard, inputs, out):
        values = [int(path.read_text()) for path in sorted(inputs["count"].dir.glob("*.txt"))]
        out.path.write_text(str(sum(values) + ctx.params["offset"]))
        return {}


REGISTRY = {"count": Count(), "total": Total()}


def make_ctx(root, tmp_path, factor=2, offset=1, **count_extra):
    config = {"data": {"train_split": "trainval", "test_split": "test"}, "torch_threads": 0,
              "count": {"factor": factor, **count_extra}, "total": {"offset": offset}}
    return RunContext(config, VOCDataset(root), tmp_path / "cache", tmp_path / "reports")


def run(ctx, targets=("total",), force=frozenset()):
    plans = plan_stages(list(targets), REGISTRY, ctx)
    summaries = run_stages(plans, ctx, "threads", set(force))
    return {summary["stage"]: summary for summary in summaries}, {plan.stage.name: plan for plan in plans}


def test_first_run_computes_in_order_and_second_reuses(shapes_root, tmp_path):
    summaries, plans = run(make_ctx(shapes_root, tmp_path))
    assert summaries["count"]["computed"] and summaries["total"]["computed"]
    assert summaries["count"]["metrics"] == {"total": 6}
    assert plans["total"].cache.shard_path("00000").read_text() == "7"  # (0 + 2 + 4) + 1
    manifest_mtime = plans["total"].cache.manifest_path.stat().st_mtime_ns
    summaries, plans = run(make_ctx(shapes_root, tmp_path))
    assert not summaries["count"]["computed"] and not summaries["total"]["computed"]
    assert plans["total"].cache.manifest_path.stat().st_mtime_ns == manifest_mtime


def test_downstream_param_change_reruns_only_downstream(shapes_root, tmp_path):
    first, _ = run(make_ctx(shapes_root, tmp_path, offset=1))
    second, plans = run(make_ctx(shapes_root, tmp_path, offset=5))
    assert second["count"]["key"] == first["count"]["key"] and not second["count"]["computed"]
    assert second["total"]["key"] != first["total"]["key"] and second["total"]["computed"]
    assert plans["total"].cache.shard_path("00000").read_text() == "11"


def test_upstream_param_change_reruns_downstream_too(shapes_root, tmp_path):
    first, _ = run(make_ctx(shapes_root, tmp_path, factor=2))
    second, _ = run(make_ctx(shapes_root, tmp_path, factor=3))
    assert second["count"]["key"] != first["count"]["key"]
    assert second["total"]["key"] != first["total"]["key"] and second["total"]["computed"]


def test_resume_computes_only_the_missing_shards(shapes_root, tmp_path):
    _, plans = run(make_ctx(shapes_root, tmp_path), targets=("count",))
    cache = plans["count"].cache
    cache.manifest_path.unlink()
    cache.record_path("00001").unlink()  # as if killed after shard 0 and 2
    kept_mtimes = {shard: cache.record_path(shard).stat().st_mtime_ns for shard in ("00000", "00002")}
    assert [shard.id for shard in plans["count"].missing_shards] == ["00001"]
    summaries, _ = run(make_ctx(shapes_root, tmp_path), targets=("count",))
    assert summaries["count"]["computed"] and summaries["count"]["metrics"] == {"total": 6}
    assert {shard: cache.record_path(shard).stat().st_mtime_ns for shard in kept_mtimes} == kept_mtimes


def test_force_recomputes_a_cached_stage_only(shapes_root, tmp_path):
    run(make_ctx(shapes_root, tmp_path))
    summaries, _ = run(make_ctx(shapes_root, tmp_path), force={"total"})
    assert summaries["total"]["computed"] and not summaries["count"]["computed"]


def test_failing_shard_stops_the_run_and_leaves_only_finished_shards(shapes_root, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run(make_ctx(shapes_root, tmp_path, fail_on=2))
    plans = {plan.stage.name: plan
             for plan in plan_stages(["total"], REGISTRY, make_ctx(shapes_root, tmp_path, fail_on=2))}
    cache = plans["count"].cache
    assert not cache.is_complete() and not any(plans["total"].cache.dir.iterdir())
    assert not cache.shard_path("00002").exists() and not list(cache.dir.glob(".*tmp-*"))


def test_changed_data_changes_every_key_and_moved_data_keeps_them(shapes_copy, tmp_path):
    keys = {plan.stage.name: plan.key for plan in plan_stages(["total"], REGISTRY, make_ctx(shapes_copy, tmp_path))}
    moved = shutil.move(shapes_copy, tmp_path / "moved")
    moved_keys = {plan.stage.name: plan.key for plan in plan_stages(["total"], REGISTRY, make_ctx(moved, tmp_path))}
    assert moved_keys == keys
    image = next((moved / "JPEGImages").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    changed = {plan.stage.name: plan.key for plan in plan_stages(["total"], REGISTRY, make_ctx(moved, tmp_path))}
    assert all(changed[name] != keys[name] for name in keys)


def test_states_missing_cached_stale_partial(shapes_root, tmp_path):
    def states(**kwargs):
        return {plan.stage.name: plan.state()
                for plan in plan_stages(["total"], REGISTRY, make_ctx(shapes_root, tmp_path, **kwargs))}
    assert states() == {"count": "missing", "total": "missing"}
    run(make_ctx(shapes_root, tmp_path))
    assert states() == {"count": "cached", "total": "cached"}
    assert states(offset=9) == {"count": "cached", "total": "stale"}
    plans = plan_stages(["count"], REGISTRY, make_ctx(shapes_root, tmp_path))
    plans[0].cache.manifest_path.unlink()
    assert states()["count"] == "partial"


def test_upstream_order_puts_inputs_first_and_rejects_unknown_stages():
    assert upstream_order(["total"], REGISTRY, {"count": {}, "total": {}}) == ["count", "total"]
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        upstream_order(["nope"], REGISTRY, {})


@pytest.mark.parametrize("spec", ["thread", "threads:0", "local:x", "local:", "udp://x:1"])
def test_bad_scheduler_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="--scheduler"):
        parse_scheduler(spec)


def test_scheduler_specs():
    assert parse_scheduler("threads:3") == ("threads", 3) and parse_scheduler("threads")[1] >= 1
    assert parse_scheduler("local:2") == ("local", 2)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("tcp", "tcp://10.0.0.1:8786")
