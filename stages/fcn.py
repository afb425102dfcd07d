"""Semantic segmentation: an FCN, and the sliding-window baseline the lecture calls very inefficient.

    fcn-train          trains pipeline.segmentation.FCN (the upsampling, downsampling and skips the
                       config names) on random crops of the training split's SegmentationClass/ masks,
                       per-pixel cross-entropy with the void label (255) ignored; flips and, with
                       `augment`, colour changes. With `encoder: pretrain` its encoder starts as the
                       classifier the detectors start from (backbone.weights: the pretrain stage, or
                       ImageNet weights), cut at its max-pools, and its fully connected layers, turned
                       into convolutions, as the bottleneck: FCN's "adapting classifiers for dense
                       prediction"; with `scratch`, fresh blocks of `channels`. Output `00000.pt`.
    pixel-classifier   the baseline's network: the backbone the detectors start from (backbone.weights),
                       with an (N + 1)-way head, classifying a patch of its input size by the label of
                       the patch's centre pixel (background or a class), trained on patches around
                       random labelled pixels (background_fraction of them background) of the training
                       images resized by fcn.scale, as the FCN sees them.
    fcn                segments the test split with the FCN, and its first `baseline_images` with the
                       sliding-window baseline too (a patch around every `baseline_stride`-th pixel of
                       the image resized by fcn.scale, each label filling its stride x stride block; 1:
                       every pixel; labels resized back to full size), timing both on the
                       same images. Pixel accuracy, mean accuracy, mean IoU and per-class IoU of both go
                       into the manifest; the report (reports/<config>/fcn/) holds segmentation.md, a
                       confusion matrix and pictures with the predicted masks overlaid.

Images and masks come from ImageSets/Segmentation/<split>.txt and SegmentationClass/ (the shapes set
writes both; VOC2007's segmentation subset has them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.cache import StageCache
from pipeline.errors import BadInputError, ConfigError
from pipeline.stage import RunContext, Shard, ShardOutput, Stage, TrainingStage, image_shards
from stages.finetune import initial_backbone_params, load_finetuned, pretrain_input, weights_key_extras

# test-time settings of the fcn stage, not part of what fcn-train learns
TEST_PARAMS = ("images_per_shard", "baseline_images", "baseline_stride", "pictures")
# what the fcn stage counts: the FCN on every test image, and the FCN and the baseline on the baseline's images
TALLIES = ("fcn", "fcn_on_baseline_images", "sliding_window")


@dataclass
class SegmentationSet:
    """A split's images (uint8[3, H, W] on the device) and masks (uint8[H, W] numpy)."""
    image_ids: list[str]
    images: list
    masks: list[np.ndarray]


def load_segmentation_set(ctx: RunContext, image_ids, device: str, scale: float = 1.0) -> SegmentationSet:
    """The images and masks of these ids, resized by `scale`, leaving out those skipped for bad input."""
    import cv2

    from pipeline.regions import image_tensor
    kept = SegmentationSet([], [], [])
    for image_id in image_ids:
        rgb, mask = ctx.dataset.read_image(image_id), ctx.dataset.read_segmentation(image_id)
        if rgb is not None and mask is not None:
            if scale != 1:
                size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
            kept.image_ids.append(image_id)
            kept.images.append(image_tensor(rgb, device))
            kept.masks.append(mask)
    return kept


def load_training_masks(ctx: RunContext, scale: float = 1.0) -> SegmentationSet:
    split = ctx.config["data"]["train_split"]
    training = load_segmentation_set(ctx, ctx.dataset.segmentation_ids(split), ctx.device, scale)
    if not training.image_ids:
        raise BadInputError(ctx.dataset.root / "ImageSets" / "Segmentation" / f"{split}.txt",
                            "no images with segmentation masks in this split")
    return training


class FCNTrain(TrainingStage):
    """Train a fully convolutional network for semantic segmentation on the training masks."""

    name = "fcn-train"
    version = "2"
    headline_metrics = ("final_loss",)
    loss_title = "fcn-train: per-pixel cross-entropy"

    def params(self, config: dict) -> dict:
        params = {name: value for name, value in config["fcn"].items() if name not in TEST_PARAMS}
        if params["encoder"] == "pretrain":
            params = {**params, "backbone": initial_backbone_params(config)}
        return {**params, "train_split": config["data"]["train_split"], "amp": config["amp"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return pretrain_input(config) if config["fcn"]["encoder"] == "pretrain" else ()

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx) if ctx.config["fcn"]["encoder"] == "pretrain" else {}

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.training import SGDSettings, train
        from stages.finetune import initial_net
        params = ctx.config["fcn"]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        model = build_fcn(params, len(ctx.dataset.classes), ctx.config["backbone"],
                          initial_net(ctx, inputs) if params["encoder"] == "pretrain" else None)
        training = load_training_masks(ctx, params["scale"])

        def loss_of(model, batch):
            crops, masks = batch
            return torch.nn.functional.cross_entropy(model(crops), masks, ignore_index=255)

        history = train(model, random_crops(training, params), settings, out.checkpoint, ctx.device,
                        amp=ctx.config["amp"], threads=ctx.config["torch_threads"], desc=self.name, loss_of=loss_of)
        torch.save({"model": model.state_dict(), "params": params, "classes": ctx.dataset.classes,
                    "backbone": ctx.config["backbone"], "losses": history.losses}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:])), "images": len(training.image_ids)}


def build_fcn(params: dict, num_classes: int, backbone: dict, classifier=None):
    """The FCN of `params`; with encoder pretrain, its encoder is `classifier`'s trunk (a RegionNet; when
    None, one of the backbone's shape, for weights that are loaded next)."""
    from pipeline.models import build_region_net
    from pipeline.segmentation import FCN, convolutionalized, trunk_levels
    encoder = fc_layers = None
    if params["encoder"] == "pretrain":
        classifier = classifier or build_region_net(backbone["name"], num_classes + 1, backbone["input_size"])
        encoder = trunk_levels(classifier.trunk)
        fc_layers = convolutionalized(classifier)
    elif params["encoder"] != "scratch":
        raise ConfigError(f"fcn.encoder {params['encoder']!r}: expected pretrain or scratch")
    return FCN(num_classes + 1, tuple(params["channels"]), params["upsampling"], params["downsampling"],
               params["skips"], encoder, fc_layers)


def load_fcn(cache: StageCache, device: str):
    import torch
    saved = torch.load(cache.shard_path("00000"), map_location=device, weights_only=True)
    model = build_fcn(saved["params"], len(saved["classes"]), saved["backbone"])
    model.load_state_dict(saved["model"])
    return model.to(device).eval()


def random_crops(training: SegmentationSet, params: dict):
    """next_batch(rng): batch_size random crop_size crops (normalised) and their masks (int64, 255 void),
    from random training images, each flipped with probability 1/2 and, with `augment`, recoloured."""
    import torch

    from pipeline.regions import normalised, recolour
    side = params["crop_size"]

    def next_batch(rng: np.random.Generator):
        crops, masks = [], []
        for index in rng.integers(len(training.images), size=params["batch_size"]):
            image, mask = training.images[index], torch.from_numpy(training.masks[index]).to(training.images[index].device)
            height, width = mask.shape
            top, left = int(rng.integers(max(height - side, 0) + 1)), int(rng.integers(max(width - side, 0) + 1))
            crop = torch.zeros((3, side, side), device=image.device)
            crop_mask = torch.full((side, side), 255, dtype=torch.int64, device=image.device)
            window = (slice(top, top + side), slice(left, left + side))
            h, w = mask[window].shape
            crop[:, :h, :w], crop_mask[:h, :w] = normalised(image[(slice(None), *window)]), mask[window]
            if rng.random() < 0.5:
                crop, crop_mask = crop.flip(-1), crop_mask.flip(-1)
            crops.append(crop)
            masks.append(crop_mask)
        crops = torch.stack(crops)
        return recolour(crops, rng) if params["augment"] else crops, torch.stack(masks)
    return next_batch


class PixelClassifier(TrainingStage):
    """Train the sliding-window baseline's network: the label of a patch's centre pixel."""

    name = "pixel-classifier"
    version = "2"
    headline_metrics = ("final_loss",)
    loss_title = "pixel-classifier: centre-pixel cross-entropy"

    def params(self, config: dict) -> dict:
        return {**config["pixel_classifier"], "backbone": initial_backbone_params(config), "scale": config["fcn"]["scale"],
                "train_split": config["data"]["train_split"], "amp": config["amp"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        return pretrain_input(config)

    def key_extras(self, ctx: RunContext) -> dict:
        return weights_key_extras(ctx)

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        import torch

        from pipeline.regions import augment_crops
        from pipeline.training import SGDSettings, train
        from stages.finetune import initial_net
        params, patch_size = ctx.config["pixel_classifier"], ctx.config["backbone"]["input_size"]
        settings = SGDSettings.from_config(params)
        torch.manual_seed(settings.seed)
        net = initial_net(ctx, inputs)
        training = load_training_masks(ctx, ctx.config["fcn"]["scale"])  # objects at the size the FCN sees
        pixels = labelled_pixels(training.masks)

        def next_batch(rng: np.random.Generator):
            image_index, ys, xs = pixels.sample(rng, params["batch_size"], params["background_fraction"])
            crops = torch.cat([patches(training.images[i], ys[image_index == i], xs[image_index == i], patch_size)
                               for i in np.unique(image_index)])
            order = np.concatenate([np.flatnonzero(image_index == i) for i in np.unique(image_index)])
            labels = torch.from_numpy(np.array([training.masks[i][y, x] for i, y, x in
                                                zip(image_index[order], ys[order], xs[order])], dtype=np.int64))
            return augment_crops(crops, rng) if params["augment"] else crops, labels.to(crops.device)

        history = train(net, next_batch, settings, out.checkpoint, ctx.device, amp=ctx.config["amp"],
                        threads=ctx.config["torch_threads"], desc=self.name)
        torch.save({"model": net.state_dict(), "backbone": ctx.config["backbone"], "classes": ctx.dataset.classes,
                    "losses": history.losses}, out.path)
        return {"final_loss": float(np.mean(history.losses[-20:]))}


@dataclass
class LabelledPixels:
    """Per image, the flat indices of its background pixels and of its object pixels (void left out)."""
    background: list[np.ndarray]
    objects: list[np.ndarray]
    widths: list[int]

    def sample(self, rng: np.random.Generator, count: int, background_fraction: float):
        """(image index, y, x) of `count` pixels: an image uniformly, then background with probability
        background_fraction (else an object pixel, when the image has one)."""
        image_index = rng.integers(len(self.widths), size=count)
        want_background = rng.random(count) < background_fraction
        ys, xs = np.empty(count, np.int64), np.empty(count, np.int64)
        for row, (index, background) in enumerate(zip(image_index, want_background)):
            pool = self.background[index] if background or not len(self.objects[index]) else self.objects[index]
            ys[row], xs[row] = divmod(int(pool[rng.integers(len(pool))]), self.widths[index])
        return image_index, ys, xs


def labelled_pixels(masks: list[np.ndarray]) -> LabelledPixels:
    return LabelledPixels([np.flatnonzero(mask == 0) for mask in masks],
                          [np.flatnonzero((mask > 0) & (mask != 255)) for mask in masks],
                          [mask.shape[1] for mask in masks])


def patches(image, ys: np.ndarray, xs: np.ndarray, size: int):
    """Normalised size x size patches of a uint8[3, H, W] image around pixels (ys, xs), each at row and
    column size // 2 of its patch, sampled exactly on the image's pixels; the mean colour outside it."""
    import torch

    from pipeline.regions import warp_regions
    corners = torch.from_numpy(np.stack([xs, ys], axis=1).astype(np.float32)) - size // 2
    boxes = torch.cat([corners, corners + size], dim=1)
    return warp_regions(image, boxes, size, context_pad=0)


def segment_by_windows(net, image, patch_size: int, stride: int, scale: float = 1.0, batch_size: int = 1024):
    """The sliding-window baseline: classify a patch around every stride-th pixel (rows and columns) of
    the image resized by `scale` (the FCN's: objects then have the size the classifier was trained on),
    each label filling its stride x stride block, the labels resized back (nearest).
    uint8[3, H, W] image -> labels uint8[H, W] (numpy)."""
    import cv2
    import torch

    from pipeline.segmentation import resize
    full_height, full_width = image.shape[-2:]
    image = resize(image[None].float(), scale)[0].round().clamp(0, 255).to(torch.uint8)
    height, width = image.shape[-2:]
    ys = np.minimum(np.arange(0, height, stride) + stride // 2, height - 1)  # the centre of each block
    xs = np.minimum(np.arange(0, width, stride) + stride // 2, width - 1)
    grid_y, grid_x = (axis.ravel() for axis in np.meshgrid(ys, xs, indexing="ij"))
    labels = []
    with torch.no_grad():
        for start in range(0, len(grid_y), batch_size):
            crops = patches(image, grid_y[start:start + batch_size], grid_x[start:start + batch_size], patch_size)
            labels.append(net(crops).argmax(1).to(torch.uint8).cpu())
    grid = torch.cat(labels).numpy().reshape(len(ys), len(xs))
    blocks = np.repeat(np.repeat(grid, stride, axis=0), stride, axis=1)[:height, :width]
    return blocks if scale == 1 else cv2.resize(blocks, (full_width, full_height), interpolation=cv2.INTER_NEAREST)


class FCNEvaluate(Stage):
    """Segment the test split with the FCN (and the sliding-window baseline); pixel accuracy, mean IoU."""

    name = "fcn"
    version = "2"
    inputs = ("fcn-train", "pixel-classifier")
    headline_metrics = ("mean_iou", "pixel_accuracy", "mean_accuracy", "baseline_mean_iou", "baseline_slowdown")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**{name: config["fcn"][name] for name in TEST_PARAMS}, "test_split": config["data"]["test_split"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        return image_shards(ctx.dataset.segmentation_ids(ctx.config["data"]["test_split"]),
                            ctx.config["fcn"]["images_per_shard"])

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from pipeline.regions import normalised
        from pipeline.segmentation import confusion_matrix, predict_mask
        from pipeline.timing import Clock
        params, num_labels = ctx.config["fcn"], len(ctx.dataset.classes) + 1
        baseline_ids = set(ctx.dataset.segmentation_ids(ctx.config["data"]["test_split"])[:params["baseline_images"]])
        fcn = load_fcn(inputs["fcn-train"], ctx.device)
        window_net, backbone = load_finetuned(inputs["pixel-classifier"], ctx.device)  # the same kind of file
        test = load_segmentation_set(ctx, shard.items, ctx.device)
        tallies = {name: {"confusion": np.zeros((num_labels, num_labels), np.int64), "seconds": 0.0, "images": 0}
                   for name in TALLIES}

        def tally(name: str, truth: np.ndarray, mask: np.ndarray, seconds: float) -> None:
            tallies[name]["confusion"] += confusion_matrix(truth, mask, num_labels)
            tallies[name]["seconds"] += seconds
            tallies[name]["images"] += 1

        with h5py.File(out.path, "w") as shard_file:
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

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        from pipeline.segmentation import segmentation_metrics
        results = {}
        for name in TALLIES:
            parts = [record["metrics"][name] for record in records.values()]
            images = sum(part["images"] for part in parts)
            if images:
                confusion = np.sum([part["confusion"] for part in parts], axis=0)
                results[name] = {**segmentation_metrics(confusion), "confusion": confusion.tolist(), "images": images,
                                 "seconds_per_image": sum(part["seconds"] for part in parts) / images}
        labels = ["background", *ctx.dataset.classes]
        write_report(ctx, cache, results, labels)
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
        return {**metrics, "upsampling": ctx.config["fcn"]["upsampling"], "skips": ctx.config["fcn"]["skips"]}


def write_report(ctx: RunContext, cache: StageCache, results: dict, labels: list[str]) -> None:
    """segmentation.md (metrics of both methods, IoU per label), segmentation.json, confusion.png and
    pictures/: the first test images with the truth and each method's labels overlaid."""
    report_dir = cache.report_dir
    (report_dir / "segmentation.json").write_text(json.dumps({"labels": labels, **results}, indent=2))
    (report_dir / "segmentation.md").write_text(markdown_report(ctx, results, labels))
    plot_confusion(report_dir / "confusion.png", np.asarray(results["fcn"]["confusion"]), labels,
                   f"FCN ({ctx.config['fcn']['upsampling']}, {ctx.config['fcn']['skips']} skips): confusion, "
                   f"rows normalised")
    draw_overlays(ctx, cache, report_dir / "pictures")


def markdown_report(ctx: RunContext, results: dict, labels: list[str]) -> str:
    from pipeline.reports import markdown_table
    params = ctx.config["fcn"]
    titles = {"fcn": "FCN, every test image", "fcn_on_baseline_images": "FCN, the baseline's images",
              "sliding_window": f"sliding window (stride {params['baseline_stride']}), the baseline's images"}
    summary = markdown_table(["method", "images", "pixel accuracy", "mean accuracy", "mean IoU", "s / image"], [
        [titles[name], r["images"], r["pixel_accuracy"], r["mean_accuracy"], r["mean_iou"], r["seconds_per_image"]]
        for name, r in results.items()])
    per_label = markdown_table(["label", *(titles[name] for name in results)], [
        [label, *("-" if r["iou"][index] is None else r["iou"][index] for r in results.values())]
        for index, label in enumerate(labels)])
    encoder = (f"the {ctx.config['backbone']['name']} classifier's conv layers and convolutionalized fc layers "
               f"(backbone.weights: {ctx.config['backbone']['weights']})" if params["encoder"] == "pretrain"
               else f"fresh conv blocks of {params['channels']} channels")
    lines = ["# Semantic segmentation\n",
             f"FCN: encoder {encoder}, {params['upsampling']} upsampling, {params['downsampling']} downsampling, "
             f"{params['skips']} skip connections; images scaled by {params['scale']}; trained "
             f"{params['iterations']} iterations on {params['crop_size']} px crops. Device: {ctx.device}. "
             f"Void pixels (255) are not counted.\n",
             summary]
    if "sliding_window" in results:
        baseline, fcn = results["sliding_window"], results["fcn_on_baseline_images"]
        lines.append(f"On the same {baseline['images']} images the sliding window takes "
                     f"{baseline['seconds_per_image'] / fcn['seconds_per_image']:.0f}x the FCN's time: it runs the "
                     f"network once per classified pixel ({patches_per_image(ctx)}), where the FCN shares "
                     f"one pass over the image between every pixel.\n")
    lines += ["## IoU per label\n", per_label]
    return "\n".join(lines)


def patches_per_image(ctx: RunContext) -> str:
    stride, scale = ctx.config["fcn"]["baseline_stride"], ctx.config["fcn"]["scale"]
    every = "every pixel" if stride == 1 else f"every pixel {stride} apart in x and y"
    of_image = "" if scale == 1 else f" of the image scaled by {scale}"
    return f"{every}{of_image}, a {ctx.config['backbone']['input_size']} px patch each"


def plot_confusion(path, confusion: np.ndarray, labels: list[str], title: str) -> None:
    from pipeline.reports import new_figure, save_figure
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


def draw_overlays(ctx: RunContext, cache: StageCache, folder) -> None:
    """<image id>.png: the image, then the truth and each method's labels blended over it (VOC colours)."""
    import cv2

    from pipeline.data.shapes import voc_palette
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    folder.mkdir(exist_ok=True)
    image_ids = ctx.dataset.segmentation_ids(ctx.config["data"]["test_split"])[:ctx.config["fcn"]["pictures"]]
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
        panels = [rgb.copy()] + [cv2.addWeighted(rgb, 0.45, palette[mask], 0.55, 0)
                          for mask in (truth, *with_masks[image_id].values())]
        titles = ["image", "truth", *with_masks[image_id]]
        for panel, title in zip(panels, titles):
            cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imwrite(str(folder / f"{image_id}.png"), cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR))
