"""pool5 features of every ground-truth box and proposal of the training images (R-CNN §2.2), in HDF5.

The SVMs and box regressors train on them (and fc6 / fc7, computed from them through the fine-tuned fc
layers). Regions are warped on the device with context padding (pipeline.regions) and run through the
conv layers in batches (in bf16 with `amp` on CUDA, or `cpu_amp` on a CPU with bf16 units: pipeline.precision;
the manifest says which); the layout is pipeline.features' (one file per image shard, a group per image).
The test images' features are computed by R-CNN's detector itself (rcnn-detect), from pixels, so that
the timed test pass is the evaluated one. The manifest records the bytes stored per region.
"""
from __future__ import annotations

from pipeline.engine.cache import StageCache, hdf5_file
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards
from pipeline.features import features_summary, image_regions, pool5_features, write_image_features
from pipeline.precision import cpu_amp_param, features_bf16
from pipeline.proposals import read_proposals
from pipeline.weights import load_finetuned


class Features(Stage):
    """pool5 features of every ground-truth box and proposal of the training images, in HDF5 per shard."""

    name = "features"
    version = "4"  # 4: R-CNN's warp, one bilinear sample per pixel (pipeline.regions)
    inputs = ("proposals", "finetune")
    headline_metrics = ("regions", "bytes_per_region", "regions_per_second")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["features"], "amp": config["amp"], **cpu_amp_param(config)}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return image_shards(ctx.dataset.image_ids(ctx.train_split), ctx.params["images_per_shard"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        net, backbone, _ = load_finetuned(inputs["finetune"], ctx.device)
        proposals = read_proposals(inputs["proposals"], shard.items)
        bf16 = features_bf16(ctx.device, params["amp"], params["cpu_amp"])
        regions = dim = 0
        with hdf5_file(out.path) as shard_file:
            shard_file.attrs["kind"] = "pool5"
            for image_id in shard.items:
                rgb = ctx.dataset.read_image(image_id)
                if rgb is None or image_id not in proposals:  # skipped for bad input
                    continue
                regions_of_image = image_regions(ctx.dataset, image_id, proposals[image_id])
                pool5 = pool5_features(net, rgb, regions_of_image.boxes, backbone, params["batch_size"], ctx.device,
                                       bf16)
                write_image_features(shard_file, image_id, regions_of_image, pool5, params)
                regions, dim = regions + len(pool5), pool5.shape[1]
        return {"regions": regions, "feature_dim": dim, "trunk_precision": "bf16" if bf16 else "float32"}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        precisions = sorted({record["metrics"]["trunk_precision"] for record in records.values()})
        return {**features_summary(records, ctx.device, ctx.params["dtype"]), "trunk_precision": ", ".join(precisions)}
