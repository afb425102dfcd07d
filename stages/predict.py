"""`rcnn predict` and `rcnn explain`: a trained method's detector on given images, as stages built per call.

    predict-proposals   region proposals of the given images with the config's own settings
                        (pipeline.proposals.propose, as the proposals stage), cached by image content.
    <method>-predict    the method's detector (pipeline.methods: the one its detect stage evaluates) on each
                        image, the method's result variant: float32[D, 6] rows per image, with the seconds
                        it took, cached by image content, the detector's trained outputs and its settings.
    <method>-explain    the steps in between that the method's explainer keeps (pipeline.explain: scores
                        before NMS, the feature map, the RPN's objectness, ...): one HDF5 group per image,
                        arrays as datasets and scalars as attributes, drawn by `rcnn explain`.
All key the images by their content (sha256), so the same pictures under other names or folders reuse
the results, and none depends on the data set the detector was trained on except through the keys of
the trained outputs. The shard files hold one dataset (or group) per image, named by its digest.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np

from pipeline.data.reader import read_rgb
from pipeline.engine.cache import StageCache, hdf5_file, sha256_of
from pipeline.engine.errors import BadInputError
from pipeline.engine.runner import RunContext, StagePlan, plan_stages
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards
from pipeline.methods import Method
from pipeline.proposals import proposal_files_digests, proposal_params, propose, read_proposals
from pipeline.timing import Clock

IMAGES_PER_SHARD = 10


class PredictImages:
    """The images of one `rcnn predict` call: path -> content digest, digest -> path (the first of equal files),
    and what to do with an unreadable one (on_bad_input: error | skip)."""

    def __init__(self, paths: list[Path], on_bad_input: str):
        self.on_bad_input = on_bad_input
        self.digest_of = {path: sha256_of(path) for path in paths}
        self.path_of: dict[str, Path] = {}
        for path, digest in self.digest_of.items():
            self.path_of.setdefault(digest, path)

    def shards(self) -> list[Shard]:
        return image_shards(list(self.path_of), IMAGES_PER_SHARD)

    def read(self, digest: str) -> tuple[np.ndarray | None, dict]:
        """The image as RGB, or (None, {path: problem}) when it is unreadable and bad input is skipped."""
        try:
            return read_rgb(self.path_of[digest]), {}
        except BadInputError as error:
            if self.on_bad_input == "error":
                raise
            return None, {error.path: error.problem}


class PredictProposals(Stage):
    """Region proposals of images outside the data set, with the config's proposal settings."""

    name = "predict-proposals"
    version = "1"
    reads_data_set = False
    headline_metrics = ("images", "proposals_per_image")

    def __init__(self, images: PredictImages):
        self.images = images

    def params(self, config: dict) -> dict:
        proposals = {name: value for name, value in proposal_params(config).items()
                     if name not in ("recall_at", "images_per_shard")}
        return {**proposals, "on_bad_input": self.images.on_bad_input}

    def key_extras(self, ctx: StageContext) -> dict:
        return proposal_files_digests(ctx.params)

    def shards(self, ctx: StageContext) -> list[Shard]:
        return self.images.shards()

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        cv2.setNumThreads(1)
        skipped, boxes_written = {}, 0
        with hdf5_file(out.path) as shard_file:
            for digest in shard.items:
                rgb, problem = self.images.read(digest)
                skipped.update(problem)
                if rgb is not None:
                    shard_file[digest] = boxes = propose(rgb, ctx.params)
                    boxes_written += len(boxes)
        return {"images": len(shard.items) - len(skipped), "boxes": boxes_written, "skipped": skipped}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        images = sum(record["metrics"]["images"] for record in records.values())
        return {"images": images,
                "proposals_per_image": sum(r["metrics"]["boxes"] for r in records.values()) / max(images, 1),
                "skipped": skipped_of(records)}


class Predict(Stage):
    """Run a trained method's detector on images outside the data set."""

    version = "1"
    reads_data_set = False
    runs_on_device = True
    headline_metrics = ("images", "detections_per_image", "seconds_per_image")

    def __init__(self, method: Method, images: PredictImages):
        self.method, self.images = method, images
        self.name = f"{method.name}-predict"
        self.inputs = ((PredictProposals.name,) * method.uses_proposals
                       + tuple(dict.fromkeys(method.model_stages.values())))

    def params(self, config: dict) -> dict:
        return {**self.method.test_params(config), "on_bad_input": self.images.on_bad_input}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return self.images.shards()

    def readable_images(self, shard: Shard, inputs: dict, skipped: dict):
        """(digest, RGB image, its proposals or None) of each readable image of the shard; the problems of those
        skipped for bad input go into `skipped`."""
        proposals = read_proposals(inputs[PredictProposals.name], shard.items) if self.method.uses_proposals else {}
        for digest in shard.items:
            rgb, problem = self.images.read(digest)
            skipped.update(problem)
            if rgb is not None and (digest in proposals or not self.method.uses_proposals):
                yield digest, rgb, proposals.get(digest)

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        detector = self.method.detector(inputs, ctx.params, ctx.device)
        images, detections, seconds, skipped = 0, 0, 0.0, {}
        with hdf5_file(out.path) as shard_file:
            for digest, rgb, proposals in self.readable_images(shard, inputs, skipped):
                clock = Clock(ctx.device)
                rows = detector(rgb, proposals, (self.method.result,), clock)[self.method.result]
                shard_file[digest] = rows
                shard_file[digest].attrs.update(seconds=clock.total(), width=rgb.shape[1], height=rgb.shape[0])
                images, detections, seconds = images + 1, detections + len(rows), seconds + clock.total()
        return {"images": images, "detections": detections, "seconds": seconds, "classes": detector.classes,
                "skipped": skipped}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        images = sum(record["metrics"]["images"] for record in records.values())
        return {"images": images, "classes": next(iter(records.values()))["metrics"]["classes"],
                "detections_per_image": sum(r["metrics"]["detections"] for r in records.values()) / max(images, 1),
                "seconds_per_image": sum(r["metrics"]["seconds"] for r in records.values()) / max(images, 1),
                "skipped": skipped_of(records)}


class Explain(Predict):
    """What a method's explainer keeps of its detector's steps on each image, for `rcnn explain` to draw."""

    version = "1"
    headline_metrics = ("images",)

    def __init__(self, method: Method, images: PredictImages):
        super().__init__(method, images)
        self.name = f"{method.name}-explain"

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        models = self.method.models(inputs, ctx.params, ctx.device)
        images, skipped = 0, {}
        with hdf5_file(out.path) as shard_file:
            for digest, rgb, proposals in self.readable_images(shard, inputs, skipped):
                group = shard_file.create_group(digest)
                for name, value in self.method.explainer.compute(models, rgb, proposals, ctx.params,
                                                                 ctx.device).items():
                    if isinstance(value, np.ndarray):
                        group[name] = value
                    else:
                        group.attrs[name] = value
                images += 1
        return {"images": images, "classes": models.classes, "skipped": skipped}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        return {"images": sum(record["metrics"]["images"] for record in records.values()),
                "classes": next(iter(records.values()))["metrics"]["classes"], "skipped": skipped_of(records)}


def skipped_of(records: dict) -> dict[str, str]:
    """path -> problem of every image the shards skipped for bad input."""
    return {path: problem for record in records.values() for path, problem in record["metrics"]["skipped"].items()}


def read_explained(cache: StageCache, digest: str) -> dict:
    """The arrays and scalars an explain output holds for one image (by its content digest)."""
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            if digest in shard_file:
                group = shard_file[digest]
                return {**{name: dataset[()] for name, dataset in group.items()}, **dict(group.attrs)}
    raise KeyError(digest)


def prediction_plans(method: Method, images: PredictImages, registry: dict[str, Stage],
                     run: RunContext, explain: bool = False) -> tuple[list[StagePlan], list[str]]:
    """The plans of `<method>-predict` (or with `explain`, `<method>-explain`) on these images (their proposals,
    the method's trained stages, then the prediction last), and the trained stages that are not cached yet."""
    last = Explain(method, images) if explain else Predict(method, images)
    stages = {stage.name: stage for stage in (PredictProposals(images), last)}
    plans = plan_stages([last.name], {**registry, **stages}, run)
    untrained = [plan.stage.name for plan in plans if plan.stage.name in registry and not plan.cache.is_complete()]
    return plans, untrained


def read_predictions(cache: StageCache) -> dict[str, tuple[np.ndarray, dict]]:
    """image digest -> (detections float32[D, 6], attributes: seconds, width, height) of a predict output."""
    predictions = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            predictions.update({digest: (dataset[()], dict(dataset.attrs)) for digest, dataset in shard_file.items()})
    return predictions
