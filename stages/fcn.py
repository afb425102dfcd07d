"""Semantic segmentation: an FCN, and the sliding-window baseline the lecture calls very inefficient.

    fcn-train          trains pipeline.segmentation.FCN (the upsampling, downsampling and skips the
                       config names) on random crops of the training split's SegmentationClass/ masks,
                       per-pixel cross-entropy with the void label (255) ignored; flips and, with
                       `augment`, colour changes. With `encoder: pretrain` its encoder starts as the
                       classifier the detectors start from (backbone.weights: the pretrain stage, or
                       ImageNet weights), cut at its max-pools, and its fully connected layers, turned
                       into convolutions, as the bottleneck: FCN's "adapting classifiers for dense
                       prediction"; with `scratch`, fresh blocks of `channels`. Output `00000.pt`.
    fcn-evaluate       segments the test split with the FCN, and its first `baseline_images` with the
                       sliding-window baseline too (pipeline.segmentation_data.segment_by_windows, with
                       the pixel-classifier stage's network: a patch around every `baseline_stride`-th
                       pixel of the image resized by fcn.scale), timing both on the same images. Pixel
                       accuracy, mean accuracy, mean IoU and per-class IoU of both go into the manifest;
                       the report (reports/<config>/fcn-evaluate/) holds segmentation.md, a confusion
                       matrix and pictures with the predicted masks overlaid.

`rcnn run --methods fcn` runs both, with the pixel classifier. Images and masks come from
ImageSets/Segmentation/<split>.txt and SegmentationClass/ (the shapes set writes both).
"""
from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import torch

from pipeline.engine.cache import StageCache, hdf5_file, save_torch
from pipeline.engine.stage import Shard, ShardOutput, Stage, StageContext, image_shards, thaw
from pipeline.regions import normalised
from pipeline.reports import markdown_table, new_figure, overlay_mask, save_figure
from pipeline.segmentation import build_fcn, confusion_matrix, load_fcn, predict_mask, segmentation_metrics
from pipeline.segmentation_data import load_segmentation_set, load_training_masks, random_crops, segment_by_windows
from pipeline.timing import Clock
from pipeline.training import TrainingStage, train
from pipeline.weights import StartsFromBackbone, initial_net, load_finetuned

# test-time settings of fcn-evaluate, not part of what fcn-train learns
TEST_PARAMS = ("images_per_shard", "baseline_images", "baseline_stride", "pictures")
# what fcn-evaluate counts: the FCN on every test image, and the FCN and the baseline on the baseline's images
TALLIES = ("fcn", "fcn_on_baseline_images", "sliding_window")


class FCNTrain(StartsFromBackbone, TrainingStage):
    """Train a fully convolutional network for semantic segmentation on the training masks."""

    name = "fcn-train"
    version = "2"
    headline_metrics = ("final_loss",)
    loss_title = "fcn-train: per-pixel cross-entropy"

    def params(self, config: dict) -> dict:
        params = {name: value for name, value in config["fcn"].items() if name not in TEST_PARAMS}
        # a scratch encoder starts from nothing: no backbone in its params, so none in its inputs or key
        backbone = self.backbone_params(config) if params["encoder"] == "pretrain" else {"amp": config["amp"]}
        return {**params, **backbone}


    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        settings = self.start(params)
        pretrained = params["encoder"] == "pretrain"
        model = build_fcn(params, len(ctx.classes), params.get("backbone"),
                          initial_net(params["backbone"], len(ctx.classes), inputs) if pretrained else None)
        training = load_training_masks(ctx.dataset, ctx.train_split, ctx.device, params["scale"])

        def loss_of(model, batch):
            crops, masks = batch
            return torch.nn.functional.cross_entropy(model(crops), masks, ignore_index=255)

        history = train(model, random_crops(training, params), settings, out.checkpoint, ctx.device,
                        amp=params["amp"], threads=ctx.threads, desc=self.name, loss_of=loss_of)
        save_torch({"model": model.state_dict(), "params": thaw(params), "classes": ctx.classes,
                    "losses": history.losses}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:])), "images": len(training.image_ids)}


class FCNEvaluate(Stage):
    """Segment the test split with the FCN (and the sliding-window baseline); pixel accuracy, mean IoU."""

    name = "fcn-evaluate"
    version = "3"
    inputs = ("fcn-train", "pixel-classifier")
    headline_metrics = ("mean_iou", "pixel_accuracy", "mean_accuracy", "baseline_mean_iou", "baseline_slowdown")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**{name: config["fcn"][name] for name in TEST_PARAMS}, "scale": config["fcn"]["scale"]}

    def shards(self, ctx: StageContext) -> list[Shard]:
        return image_shards(ctx.dataset.segmentation_ids(ctx.test_split), ctx.params["images_per_shard"])

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params, num_labels = ctx.params, len(ctx.classes) + 1
        baseline_ids = set(ctx.dataset.segmentation_ids(ctx.test_split)[:params["baseline_images"]])
        fcn, _ = load_fcn(inputs["fcn-train"], ctx.device)
        window_net, backbone, _ = load_finetuned(inputs["pixel-classifier"], ctx.device)  # finetune's file layout
        test = load_segmentation_set(ctx.dataset, shard.items, ctx.device)
        tallies = {name: {"confusion": np.zeros((num_labels, num_labels), np.int64), "seconds": 0.0, "images": 0}
                   for name in TALLIES}

        def tally(name: str, truth: np.ndarray, mask: np.ndarray, seconds: float) -> None:
            tallies[name]["confusion"] += confusion_matrix(truth, mask, num_labels)
            tallies[name]["seconds"] += seconds
            tallies[name]["images"] += 1

        with hdf5_file(out.path) as shard_file:
            for image_id, image, truth in zip(test.image_ids, test.images, test.masks):
                clock = Clock(ctx.device)
                fcn_mask = predict_mask(fcn, normalised(image), params["scale"]).cpu().numpy()
                fcn_seconds = clock.lap()
                shard_file.create_dataset(f"fcn/{image_id}", data=fcn_mask, compression="lzf")
                tally("fcn", truth, fcn_mask, fcn_seconds)
                if image_id in baseline_ids:
                    window_mask = segment_by_windows(window_net, image, backbone["input_size"],
                                                     params["baseline_stride"], params["scale"])
                    shard_file.create_dataset(f"sliding_window/{image_id}", data=window_mask, compression="lzf")
                    tally("sliding_window", truth, window_mask, clock.lap())
                    tally("fcn_on_baseline_images", truth, fcn_mask, fcn_seconds)
        return {name: {**tally_, "confusion": tally_["confusion"].tolist()} for name, tally_ in tallies.items()}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        results = {}
        for name in TALLIES:
            parts = [record["metrics"][name] for record in records.values()]
            images = sum(part["images"] for part in parts)
            if images:
                confusion = np.sum([part["confusion"] for part in parts], axis=0)
                results[name] = {**segmentation_metrics(confusion), "confusion": confusion.tolist(), "images": images,
                                 "seconds_per_image": sum(part["seconds"] for part in parts) / images}
        labels = ["background", *ctx.classes]
        trained = inputs["fcn-train"].manifest()["description"]["params"]  # what the report says of the network
        write_report(ctx, cache, results, labels, trained)
        fcn = results["fcn"]
        metrics = {name: fcn[name] for name in ("pixel_accuracy", "mean_accuracy", "mean_iou", "seconds_per_image")}
        metrics["iou"] = dict(zip(labels, fcn["iou"]))
        if "sliding_window" in results:
            baseline, same_images = results["sliding_window"], results["fcn_on_baseline_images"]
            metrics.update({"baseline_images": baseline["images"], "baseline_mean_iou": baseline["mean_iou"],
                            "baseline_pixel_accuracy": baseline["pixel_accuracy"],
                            "baseline_seconds_per_image": baseline["seconds_per_image"],
                            "fcn_mean_iou_on_baseline_images": same_images["mean_iou"],
                            "baseline_slowdown": baseline["seconds_per_image"] / same_images["seconds_per_image"]})
        return {**metrics, "upsampling": trained["upsampling"], "skips": trained["skips"]}


def write_report(ctx: StageContext, cache: StageCache, results: dict, labels: list[str], trained: dict) -> None:
    """segmentation.md (metrics of both methods, IoU per label), segmentation.json, confusion.png and
    pictures/: the first test images with the truth and each method's labels overlaid."""
    report_dir = cache.report_dir
    (report_dir / "segmentation.json").write_text(json.dumps({"labels": labels, **results}, indent=2))
    (report_dir / "segmentation.md").write_text(markdown_report(ctx, results, labels, trained))
    plot_confusion(report_dir / "confusion.png", np.asarray(results["fcn"]["confusion"]), labels,
                   f"FCN ({trained['upsampling']}, {trained['skips']} skips): confusion, rows normalised")
    draw_overlays(ctx, cache, report_dir / "pictures")


def markdown_report(ctx: StageContext, results: dict, labels: list[str], trained: dict) -> str:
    params = ctx.params
    titles = {"fcn": "FCN, every test image", "fcn_on_baseline_images": "FCN, the baseline's images",
              "sliding_window": f"sliding window (stride {params['baseline_stride']}), the baseline's images"}
    summary = markdown_table(["method", "images", "pixel accuracy", "mean accuracy", "mean IoU", "s / image"], [
        [titles[name], r["images"], r["pixel_accuracy"], r["mean_accuracy"], r["mean_iou"], r["seconds_per_image"]]
        for name, r in results.items()])
    per_label = markdown_table(["label", *(titles[name] for name in results)], [
        [label, *("-" if r["iou"][index] is None else r["iou"][index] for r in results.values())]
        for index, label in enumerate(labels)])
    encoder = (f"the {trained['backbone']['name']} classifier's conv layers and convolutionalized fc layers "
               f"(backbone.weights: {trained['backbone']['weights']})" if trained["encoder"] == "pretrain"
               else f"fresh conv blocks of {trained['channels']} channels")
    lines = ["# Semantic segmentation\n",
             f"FCN: encoder {encoder}, {trained['upsampling']} upsampling, {trained['downsampling']} downsampling, "
             f"{trained['skips']} skip connections; images scaled by {params['scale']}; trained "
             f"{trained['iterations']} iterations on {trained['crop_size']} px crops. Device: {ctx.device}. "
             f"Void pixels (255) are not counted.\n",
             summary]
    if "sliding_window" in results:
        baseline, fcn = results["sliding_window"], results["fcn_on_baseline_images"]
        lines.append(f"On the same {baseline['images']} images the sliding window takes "
                     f"{baseline['seconds_per_image'] / fcn['seconds_per_image']:.0f}x the FCN's time: it runs the "
                     f"network once per classified pixel ({patches_per_image(params)}), where the FCN shares "
                     f"one pass over the image between every pixel.\n")
    lines += ["## IoU per label\n", per_label]
    return "\n".join(lines)


def patches_per_image(params) -> str:
    stride, scale = params["baseline_stride"], params["scale"]
    every = "every pixel" if stride == 1 else f"every pixel {stride} apart in x and y"
    of_image = "" if scale == 1 else f" of the image scaled by {scale}"
    return f"{every}{of_image}, a patch of the pixel classifier's input size each"


def plot_confusion(path, confusion: np.ndarray, labels: list[str], title: str) -> None:
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    figure = new_figure(6.5, 5.5)
    axes = figure.add_subplot()
    image = axes.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(rows):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if value > 0.5 else "black")
    axes.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true", title=title)
    axes.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    axes.set_yticklabels(labels, fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046)
    save_figure(figure, path)


def draw_overlays(ctx: StageContext, cache: StageCache, folder) -> None:
    """<image id>.png: the image, then the truth and each method's labels blended over it (VOC colours)."""
    folder.mkdir(exist_ok=True)
    image_ids = ctx.dataset.segmentation_ids(ctx.test_split)[:ctx.params["pictures"]]
    with_masks = {}
    for path in sorted(cache.dir.glob(f"*{cache.shard_suffix}")):
        with h5py.File(path, "r") as shard_file:
            for method in shard_file:
                for image_id in set(image_ids) & set(shard_file[method]):
                    with_masks.setdefault(image_id, {})[method] = shard_file[method][image_id][()]
    for image_id in image_ids:
        rgb, truth = ctx.dataset.read_image(image_id), ctx.dataset.read_segmentation(image_id)
        if rgb is None or truth is None or image_id not in with_masks:
            continue
        panels = [rgb.copy()] + [overlay_mask(rgb, mask) for mask in (truth, *with_masks[image_id].values())]
        titles = ["image", "truth", *with_masks[image_id]]
        for panel, title in zip(panels, titles):
            cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imwrite(str(folder / f"{image_id}.png"), cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR))
