"""Classification + localization: the lecture's single-object recipe, before detection.

`rcnn localize` trains, in one shard, three phases on the training split's single-object images
(each image warped whole to input_size x input_size), then evaluates on the test split's:

    classify     the backbone the detectors start from (backbone.weights: the pretrain stage's classifier
                 of ground-truth crops, or ImageNet weights), fc6 new where the whole-image pool5 is larger,
                 as a classifier of the image's object: cross-entropy, every layer
    head         a new fully-connected regression head (fc7 -> 4 numbers: x1, y1, x2, y2 as fractions of
                 the image's width and height) trained alone with an L2 loss, the rest frozen
    end-to-end   (when end_to_end_iterations > 0) every layer, cross-entropy + box_weight x L2

Test: the class head's arg-max and the regression head's box, after `head` and after `end-to-end`;
accuracy, mean IoU of the predicted box with the true one, and the fraction with IoU >= 0.5, in the
manifest and in reports/<config>/localize/ (localize.md, loss plots, pictures with both boxes).
Images with other than one (non-difficult) object are left out and counted: generate the data with
`rcnn data shapes --single-object --out data/shapes-single` and pass `--data data/shapes-single`.
Each phase is resumable (its own checkpoint; a finished phase is kept until the shard is done).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from pipeline.engine.cache import StageCache, commit_file, save_torch, temporary_path
from pipeline.engine.errors import DataSetError
from pipeline.engine.stage import Shard, ShardOutput, StageContext
from pipeline.regions import image_tensor, normalised, recolour
from pipeline.reports import markdown_table, plot_loss
from pipeline.training import History, SGDSettings, TrainingStage, train
from pipeline.weights import StartsFromBackbone, initial_net

PHASES = ("classify", "head", "end_to_end")
EVALUATED = ("head", "end_to_end")  # the phases after which the box head exists


@dataclass
class SingleObjectImages:
    image_ids: list[str]
    images: object       # float32[N, 3, S, S], normalised, on the device
    labels: object       # int64[N]
    boxes: object        # float32[N, 4]: x1, y1, x2, y2 as fractions of the image's width and height
    left_out: int        # images of the split with other than one non-difficult object


def load_single_object_images(dataset, split: str, size: int, device: str) -> SingleObjectImages:
    image_ids, images, labels, boxes, left_out = [], [], [], [], 0
    for image_id in dataset.image_ids(split):
        gt_boxes, gt_labels, difficult = dataset.ground_truth(image_id)
        rgb = dataset.read_image(image_id)
        if rgb is None or len(gt_boxes) != 1 or difficult.any():
            left_out += 1
            continue
        height, width = rgb.shape[:2]
        image = normalised(image_tensor(rgb, device))[None]
        images.append(torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                                                      align_corners=False)[0])
        image_ids.append(image_id)
        labels.append(int(gt_labels[0]))
        boxes.append(gt_boxes[0] / np.array([width, height, width, height], np.float32))
    if not image_ids:
        raise DataSetError(dataset.split_file(split), "no image with exactly one object: localize needs "
                            "single-object images (rcnn data shapes --single-object --out data/shapes-single, "
                            "then --data data/shapes-single)")
    return SingleObjectImages(image_ids, torch.stack(images), torch.tensor(labels, device=device),
                              torch.from_numpy(np.stack(boxes)).to(device), left_out)


def build_localizer(net, num_classes: int, input_size: int):
    """The RegionNet `net` made a localizer of input_size images: fc6 taking its pool5 at that size (new,
    unless it already does), a class head of num_classes and a regression head `box_head`, fc7 -> 4."""
    net.set_fc6_input(net.pool5_dim(input_size))
    net.replace_head(num_classes)
    net.box_head = nn.Linear(net.head.in_features, 4)
    return net


def localize(net, images):
    """Class scores [N, C] and boxes [N, 4] (fractions of the image) of images[N, 3, S, S]."""
    fc7 = net.fc(net.pool5(images))
    return net.head(fc7), net.box_head(fc7)


class Localize(StartsFromBackbone, TrainingStage):
    """Classification + localization of single-object images: a class head and an L2 box-regression head."""

    name = "localize"
    version = "2"  # 2: fc6's input size probed in eval mode (RegionNet.pool5_dim)
    headline_metrics = ("accuracy", "mean_iou", "fraction_iou_0.5", "head_only_mean_iou")
    loss_title = "localize: loss per phase"

    def params(self, config: dict) -> dict:
        return {**config["localize"], **self.backbone_params(config)}

    def run_shard(self, ctx: StageContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        params = ctx.params
        torch.manual_seed(params["seed"])
        net = build_localizer(initial_net(params["backbone"], len(ctx.classes), inputs), len(ctx.classes),
                              params["input_size"])
        training = load_single_object_images(ctx.dataset, ctx.train_split, params["input_size"], ctx.device)
        test = load_single_object_images(ctx.dataset, ctx.test_split, params["input_size"], ctx.device)
        losses, parts, results = [], {}, {}
        for phase in PHASES:
            if params[f"{phase}_iterations"] == 0:
                continue
            history = train_phase(net, phase, training, params, ctx, out)
            losses += history.losses
            parts[phase] = history.losses
            if phase in EVALUATED:
                results[phase] = evaluate(net, test)
        save_torch({"model": net.state_dict(), "losses": losses, "loss_parts": parts, "results": results}, out.path)
        for phase in PHASES:
            phase_file(out, phase, "checkpoint").unlink(missing_ok=True)
            phase_file(out, phase, "pt").unlink(missing_ok=True)
        final = results[list(results)[-1]]
        return {"accuracy": final["accuracy"], "mean_iou": final["mean_iou"],
                "fraction_iou_0.5": final["fraction_iou_0.5"], "head_only_mean_iou": results["head"]["mean_iou"],
                "train_images": len(training.image_ids), "test_images": len(test.image_ids),
                "left_out": training.left_out + test.left_out,
                "phases": {phase: {name: value for name, value in result.items() if name != "predictions"}
                           for phase, result in results.items()}}

    def reduce(self, ctx: StageContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        saved = torch.load(cache.shard_path("00000"), weights_only=True)
        for phase, phase_losses in saved["loss_parts"].items():
            plot_loss(phase_losses, cache.report_dir / f"loss_{phase}.png", f"localize: {phase} phase")
        metrics = {**records["00000"]["metrics"], "device": ctx.device}
        (cache.report_dir / "localize.json").write_text(json.dumps(metrics, indent=2))
        (cache.report_dir / "localize.md").write_text(markdown_report(ctx, metrics))
        draw_boxes(ctx, saved["results"], cache.report_dir / "pictures")
        return metrics


def phase_file(out: ShardOutput, phase: str, suffix: str):
    return out.checkpoint.with_name(f"{out.checkpoint.stem}.{phase}.{suffix}")


def train_phase(net, phase: str, training: SingleObjectImages, params, ctx: StageContext, out: ShardOutput):
    """One phase, resumable: its own checkpoint while it runs, its final weights kept once it is done."""
    done = phase_file(out, phase, "pt")
    if done.is_file():
        saved = torch.load(done, map_location=ctx.device, weights_only=True)
        net.load_state_dict(saved["model"])
        return History(saved["losses"], {})
    settings = SGDSettings.from_config({**params, "iterations": params[f"{phase}_iterations"]})
    trained = list(net.box_head.parameters()) if phase == "head" else None  # None: every parameter

    def loss_of(net, batch):
        images, labels, boxes = batch
        if phase == "head":  # the features are frozen: no gradient, and batch norm and dropout at test behaviour
            net.eval()
            with torch.no_grad():
                fc7 = net.fc(net.pool5(images))
            return torch.nn.functional.mse_loss(net.box_head(fc7), boxes)
        scores, predicted = localize(net, images)
        classification = torch.nn.functional.cross_entropy(scores, labels)
        if phase == "classify":
            return classification
        return classification + params["box_weight"] * torch.nn.functional.mse_loss(predicted, boxes)

    history = train(net, image_batches(training, params), settings, phase_file(out, phase, "checkpoint"),
                    ctx.device, amp=params["amp"], threads=ctx.threads, desc=f"localize {phase}",
                    loss_of=loss_of, parameters=trained)
    temporary = temporary_path(done)
    save_torch({"model": net.state_dict(), "losses": history.losses}, temporary)
    commit_file(temporary, done)
    return history


def image_batches(training: SingleObjectImages, params: dict):
    """next_batch(rng): batch_size random training images, each flipped (box too) with probability 1/2
    and, with `augment`, recoloured."""

    def next_batch(rng: np.random.Generator):
        chosen = torch.from_numpy(rng.integers(len(training.image_ids), size=params["batch_size"]))
        images, boxes = training.images[chosen], training.boxes[chosen].clone()
        flip = torch.from_numpy(rng.random(len(chosen)) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        boxes[flip] = torch.stack([1 - boxes[flip, 2], boxes[flip, 1], 1 - boxes[flip, 0], boxes[flip, 3]], dim=1)
        if params["augment"]:
            images = recolour(images, rng)
        return images, training.labels[chosen.to(images.device)], boxes
    return next_batch


def evaluate(net, test: SingleObjectImages, batch_size: int = 64) -> dict:
    """Accuracy of the class head; IoU of the predicted box with the true one (mean, fraction >= 0.5)."""
    net.eval()
    classes, boxes = [], []
    with torch.no_grad():
        for start in range(0, len(test.image_ids), batch_size):
            scores, predicted = localize(net, test.images[start:start + batch_size])
            classes.append(scores.argmax(1))
            boxes.append(predicted)
    classes, boxes = torch.cat(classes), ordered_boxes(torch.cat(boxes))
    ious = torch.diagonal(box_iou(boxes, test.boxes))
    return {"accuracy": float((classes == test.labels).float().mean()), "mean_iou": float(ious.mean()),
            "fraction_iou_0.5": float((ious >= 0.5).float().mean()), "images": len(test.image_ids),
            "predictions": {image_id: {"class": int(c), "box": [float(v) for v in box], "iou": float(iou)}
                            for image_id, c, box, iou in zip(test.image_ids, classes, boxes, ious)}}


def ordered_boxes(boxes):
    """Regressed (x1, y1, x2, y2) made a box: corners in order, inside the image ([0, 1])."""
    boxes = boxes.clamp(0, 1)
    return torch.stack([torch.minimum(boxes[:, 0], boxes[:, 2]), torch.minimum(boxes[:, 1], boxes[:, 3]),
                        torch.maximum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 1], boxes[:, 3])], dim=1)


def markdown_report(ctx: StageContext, metrics: dict) -> str:
    params = ctx.params
    titles = {"head": "after `head` (regression head alone, features frozen)",
              "end_to_end": "after `end-to-end` (every layer, cross-entropy + L2)"}
    table = markdown_table(["model", "test images", "accuracy", "mean IoU", "IoU >= 0.5"], [
        [titles[phase], r["images"], r["accuracy"], r["mean_iou"], r["fraction_iou_0.5"]]
        for phase in EVALUATED if phase in metrics["phases"] for r in [metrics["phases"][phase]]])
    return "\n".join([
        "# Classification + localization (single object)\n",
        f"Backbone: {params['backbone']['name']} ({params['backbone']['weights']} weights), on whole images "
        f"warped to {params['input_size']} px; "
        f"{metrics['train_images']} training and {metrics['test_images']} test images with exactly one object "
        f"({metrics['left_out']} others left out). Iterations: classify {params['classify_iterations']}, head "
        f"{params['head_iterations']}, end-to-end {params['end_to_end_iterations']}. Device: {metrics['device']}.\n",
        table, "Accuracy: the class head's arg-max is the object's class. IoU: of the regressed box with the true "
        "one (the box is read as (x1, y1, x2, y2) in fractions of the image, corners put in order).\n"])


def draw_boxes(ctx: StageContext, results: dict, folder) -> None:
    """The first test images with the true box (white) and the last phase's predicted box and class."""
    folder.mkdir(exist_ok=True)
    predictions = results[list(results)[-1]]["predictions"]
    for image_id in list(predictions)[:ctx.params["pictures"]]:
        rgb = ctx.dataset.read_image(image_id)
        canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        height, width = rgb.shape[:2]
        scale = np.array([width, height, width, height])
        truth = ctx.dataset.ground_truth(image_id)[0][0]
        predicted = predictions[image_id]
        box = np.array(predicted["box"]) * scale
        cv2.rectangle(canvas, (int(truth[0]), int(truth[1])), (int(truth[2]) - 1, int(truth[3]) - 1),
                      (255, 255, 255), 1)
        cv2.rectangle(canvas, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1), (0, 200, 255), 2)
        cv2.putText(canvas, f"{ctx.classes[predicted['class']]} IoU {predicted['iou']:.2f}",
                    (int(box[0]), max(int(box[1]) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 200, 255), 1,
                    cv2.LINE_AA)
        cv2.imwrite(str(folder / f"{image_id}.jpg"), canvas)
