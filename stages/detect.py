"""`<method>-detect`: a method's test-time detector (pipeline.methods) on every test image, timed.

One stage class serves every method: it builds the method's Detector from the outputs of its trained
stages, runs it on each test image (with its cached proposals, for the methods that read them) for
every variant of the method, and writes the detections in pipeline.detections' layout. The seconds
each image took, by part, go into the shard records: the test pass that is evaluated is the one timed.
The report holds the devkit's results files of the method's result variant, `results/`.
"""
from __future__ import annotations

from pipeline.detections import read_detections, write_devkit_results
from pipeline.engine.cache import StageCache, hdf5_file
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards
from pipeline.methods import Method
from pipeline.proposals import read_proposals
from pipeline.timing import Clock


class Detect(Stage):
    """Run the method's detector on every test image; its detections of each variant, timed."""

    version = "2"
    headline_metrics = ("images", "detections_per_image", "seconds_per_image")
    runs_on_device = True

    def __init__(self, method: Method):
        self.method = method
        self.name = method.detect_stage
        self.inputs = ("proposals",) * method.uses_proposals + tuple(dict.fromkeys(method.model_stages.values()))

    def params(self, config: dict) -> dict:
        return self.method.test_params(config)

    def shards(self, ctx: StageContext) -> list[Shard]:
        return image_shards(ctx.dataset.image_ids(ctx.test_split), ctx.params["images_per_shard"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        detector = self.method.detector(inputs, ctx.params, ctx.device)
        proposals = read_proposals(inputs["proposals"], shard.items) if self.method.uses_proposals else {}
        variants = tuple(variant.name for variant in self.method.variants)
        images = detections = 0
        seconds: dict[str, float] = {}
        with hdf5_file(out.path) as shard_file:
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None or (self.method.uses_proposals and image_id not in proposals):  # bad input
                    continue
                clock = Clock(ctx.device)
                for variant, rows in detector(rgb, proposals.get(image_id), variants, clock).items():
                    shard_file[f"{variant}/{image_id}"] = rows
                detections += len(shard_file[f"{self.method.result}/{image_id}"])
                images += 1
                for part, lap in clock.laps.items():
                    seconds[part] = seconds.get(part, 0.0) + lap
        return {"images": images, "detections": detections, "seconds": seconds}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        images = sum(record["metrics"]["images"] for record in records.values())
        seconds: dict[str, float] = {}
        for record in records.values():
            for part, lap in record["metrics"]["seconds"].items():
                seconds[part] = seconds.get(part, 0.0) + lap
        write_devkit_results(cache.report_dir / "results", read_detections(cache, self.method.result), ctx.classes,
                             ctx.test_split)
        return {"images": images, "variants": [variant.name for variant in self.method.variants],
                "detections_per_image": sum(r["metrics"]["detections"] for r in records.values()) / max(images, 1),
                "seconds_per_image": sum(seconds.values()) / max(images, 1),
                "ms_per_image_by_part": {part: 1000 * lap / max(images, 1) for part, lap in seconds.items()}}
