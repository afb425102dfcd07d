"""The pool5 cache's encodings side by side: bytes against float32, read speed as the SVM stage reads, error.

    python bench/feature_cache.py [--config demo] [--data DIR] [--cache DIR] [--images 60] [--passes 3]

Needs a cache in which `rcnn run` (same config and data) has written R-CNN's features and fine-tuned
network. The features the cache holds for the first --images training images are the source (so the
float32 row is their exact float32 copy); every encoding (features.dtype x features.compression) writes
them again into a temporary folder with the features stage's own writer, then they are read back as
the SVM stage reads them (FeatureReader.read, one image at a time, as float32), best of --passes, all
encodings in the same run. Files just written sit in the page cache, so the read figure is decoding,
not the disk: on a disk-bound machine the smaller encodings gain more. The error columns: the largest
difference to the source as a fraction of its row's range, and the relative L2 error of fc7, the SVMs'
input, computed from each encoding through the fine-tuned fc layers.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.data.voc import VOCDataset
from pipeline.engine.cache import StageCache
from pipeline.engine.config import load_config
from pipeline.engine.errors import UserError
from pipeline.engine.runner import RunContext, plan_stages
from pipeline.features import FeatureReader, ImageFeatures, layer_features, training_image_ids, write_image_features
from pipeline.methods import RCNN
from pipeline.reports import markdown_table
from pipeline.weights import load_finetuned
from stages import REGISTRY

ENCODINGS = (("float32", "none"), ("float16", "none"), ("float16", "lzf"), ("float16", "gzip"), ("uint8", "none"),
             ("uint8", "lzf"), ("uint8", "gzip"))
BASELINE = ("float16", "lzf")  # the features stage's encoding before uint8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="config preset or file (default: demo)")
    parser.add_argument("--data", type=Path, help="VOC-layout root (default: the config's data.root)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: the config's cache_dir)")
    parser.add_argument("--images", type=int, default=60, help="training images whose features are re-encoded")
    parser.add_argument("--passes", type=int, default=3, help="read passes per encoding; the fastest counts")
    args = parser.parse_args()
    config = load_config(args.config, ["device=cpu"])
    data = config["data"]
    dataset = VOCDataset(args.data or data["root"], classes=data["classes"], class_split=data["train_split"])
    ctx = RunContext(config, dataset, Path(args.cache or config["cache_dir"]), Path(config["reports_dir"]))
    caches = {plan.stage.name: plan.cache for plan in plan_stages([RCNN.detect_stage], REGISTRY, ctx)}
    # the features output of this config whatever its dtype: the source is the cached values
    if not caches["features"].is_complete() or not caches["finetune"].is_complete():
        raise SystemExit("bench: features or finetune not cached for this config and data; run `rcnn run` first")
    reader = FeatureReader(caches["features"])
    image_ids = training_image_ids(dataset, data["train_split"], reader)[:args.images]
    source = {image_id: reader.read(image_id) for image_id in image_ids}
    net, _, _ = load_finetuned(caches["finetune"], "cpu")
    rows = compare_encodings(source, net, args.passes)
    regions = sum(len(image.boxes) for image in source.values())
    dim = next(iter(source.values())).features.shape[1]
    print(f"pool5 cache encodings: {len(source)} training images, {regions} regions of {dim} values "
          f"(config {args.config}, backbone {config['backbone']['name']}); read = FeatureReader.read to float32, "
          f"best of {args.passes}\n")
    print(markdown_table(["dtype", "compression", "bytes / float32", "bytes per region", "write (s)",
                          "read (regions/s)", "read vs float16 + lzf", "max error / row range",
                          "fc7 relative error"], rows))


def compare_encodings(source: dict[str, ImageFeatures], net, passes: int) -> list[list]:
    exact = {image_id: image.features.astype(np.float32) for image_id, image in source.items()}
    fc7 = {image_id: layer_features(net, features, "fc7", "cpu") for image_id, features in exact.items()}
    float32_bytes = sum(features.nbytes for features in exact.values())
    regions = sum(len(features) for features in exact.values())
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype, compression in ENCODINGS:
            cache = StageCache(Path(folder), f"{dtype}-{compression}", "bench")
            cache.dir.mkdir(parents=True)
            start = time.perf_counter()
            with h5py.File(cache.dir / f"00000{cache.shard_suffix}", "w") as shard_file:
                for image_id, image in source.items():
                    write_image_features(shard_file, image_id, image, exact[image_id],
                                         {"dtype": dtype, "compression": compression})
            written = time.perf_counter() - start
            stored = stored_feature_bytes(cache.dir / f"00000{cache.shard_suffix}")
            read_seconds, decoded = fastest_read(FeatureReader(cache), list(source), passes)
            measured[dtype, compression] = (stored, written, read_seconds, decoded)
    rows = []
    for (dtype, compression), (stored, written, read_seconds, decoded) in measured.items():
        max_error = max(float((np.abs(decoded[i] - exact[i]).max(axis=1)
                               / np.maximum(np.ptp(exact[i], axis=1), 1e-12)).max()) for i in exact)
        fc7_error = np.sqrt(sum(float(np.square(layer_features(net, decoded[i], "fc7", "cpu") - fc7[i]).sum())
                                for i in exact) / sum(float(np.square(fc7[i]).sum()) for i in exact))
        rows.append([dtype, compression, f"{stored / float32_bytes:.3f}", f"{stored / regions:.0f}", f"{written:.2f}",
                     f"{regions / read_seconds:.0f}", f"{measured[BASELINE][2] / read_seconds:.2f}x",
                     f"{max_error:.5f}", f"{fc7_error:.5f}"])
    return rows


def stored_feature_bytes(path: Path) -> int:
    """Bytes the features take in the file as stored (compressed), with uint8's per-row offset and step."""
    with h5py.File(path, "r") as shard_file:
        return sum(group[name].id.get_storage_size() for group in shard_file.values()
                   for name in ("features", "feature_offset", "feature_step") if name in group)


def fastest_read(reader: FeatureReader, image_ids: list[str], passes: int) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of the fastest pass reading every image's features as float32, and what it read."""
    best, decoded = float("inf"), {}
    for _ in range(passes):
        start = time.perf_counter()
        decoded = {image_id: reader.read(image_id).features.astype(np.float32) for image_id in image_ids}
        best = min(best, time.perf_counter() - start)
    return best, decoded


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        raise SystemExit(f"bench: {error}") from None
