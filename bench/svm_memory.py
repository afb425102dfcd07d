"""Peak memory of SVM training with hard negative mining, as the feature cache grows.

    python bench/svm_memory.py [--images 100,200,400,800] [--regions 500] [--dim 1024] [--max-cached 4000]

For each size it writes a synthetic feature cache in the features stage's layout (HDF5 per shard of
25 images: ground-truth rows with a class-dependent signal, proposals around and away from the
objects, float16 pool5 of --dim), then trains three classes' SVMs on it with the svm stage's own
code (collect_positives, mine_hard_negatives, retrain) in a fresh process, and reads that process's
peak resident memory. The features are used as they are (layer pool5), so no network is involved.
The table shows the feature cache growing with the images while the peak stays under the bound
documented in stages/svm.py: k x n x dim x 4 + n x dim x 24 bytes, n = positives + max_cached_negatives +
retrain_after + regions of one image, k = classes in the task. Two readings: the peak resident memory
(what the machine must have; it includes the allocator's retained free memory) and the peak of live
allocations traced by tracemalloc (numpy and Python objects; liblinear's own nodes are not traced).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from pipeline.reports import markdown_table

CLASSES = 3
IMAGES_PER_SHARD = 25


def write_synthetic_cache(directory: Path, images: int, regions: int, dim: int) -> list[str]:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CLASSES, dim))
    image_ids = [f"{index:06d}" for index in range(images)]
    directory.mkdir(parents=True)
    for start in range(0, images, IMAGES_PER_SHARD):
        with h5py.File(directory / f"{start // IMAGES_PER_SHARD:05d}.h5", "w") as shard:
            for image_id in image_ids[start:start + IMAGES_PER_SHARD]:
                write_image(shard.create_group(image_id), rng, centres, regions, dim)
    return image_ids


def write_image(group, rng: np.random.Generator, centres: np.ndarray, regions: int, dim: int) -> None:
    gt_classes = rng.integers(CLASSES, size=3)
    gt_boxes = np.stack([rng.uniform(0, 200, 3), rng.uniform(0, 200, 3)], 1)
    gt_boxes = np.concatenate([gt_boxes, gt_boxes + rng.uniform(30, 80, (3, 2))], 1)
    proposals = rng.uniform(0, 250, (regions - 3, 2))
    proposals = np.concatenate([proposals, proposals + rng.uniform(20, 100, (regions - 3, 2))], 1)
    near = rng.random(regions - 3) < 0.2  # a fifth of the proposals sit on an object, jittered
    owner = rng.integers(3, size=regions - 3)
    proposals[near] = gt_boxes[owner[near]] + rng.normal(0, 6, (near.sum(), 4))
    signal = np.zeros((regions, dim))
    signal[:3] = centres[gt_classes]
    signal[3:][near] = 0.6 * centres[gt_classes[owner[near]]]
    pool5 = np.maximum(signal + rng.normal(0, 1, (regions, dim)), 0)
    group["boxes"] = np.concatenate([gt_boxes, proposals]).astype(np.float32)
    group["gt_label"] = np.concatenate([gt_classes, np.full(regions - 3, -1)]).astype(np.int16)
    group["gt_difficult"] = np.zeros(regions, bool)
    group.create_dataset("features", data=pool5.astype(np.float16), chunks=(128, dim), compression="lzf")


TRAIN = """
import json, resource, sys
from pathlib import Path
import sklearn.svm, torchvision.ops  # imported before the baseline: libraries are not training memory
from pipeline.engine.cache import StageCache
from pipeline.engine.config import load_config
from pipeline.features import FeatureReader
from stages.svm import ClassSVM, collect_positives, mine_hard_negatives
directory, image_ids, max_cached = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
params = {**load_config("demo")["svm"], "max_cached_negatives": max_cached, "C": 0.01}
reader = FeatureReader(StageCache(directory.parent.parent, directory.parent.name, directory.name))
import tracemalloc
tracemalloc.start()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
transform = lambda pool5: pool5.astype("float32") * 0.5
positives = collect_positives(reader, image_ids, range(3), transform, ["a", "b", "c"])
caches = {c: ClassSVM(positives[c]) for c in range(3)}
mine_hard_negatives(reader, image_ids, caches, transform, params)
print(json.dumps({"baseline_kib": baseline, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "traced_peak_bytes": tracemalloc.get_traced_memory()[1],
                  "positives": max(len(c.positives) for c in caches.values()),
                  "retrains": sum(c.retrains for c in caches.values())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="100,200,400,800", help="feature cache sizes in images")
    parser.add_argument("--regions", type=int, default=500, help="regions per image")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--max-cached", type=int, default=4000, help="svm.max_cached_negatives")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for images in map(int, args.images.split(",")):
            directory = Path(scratch) / f"features{images}" / "key"
            image_ids = write_synthetic_cache(directory, images, args.regions, args.dim)
            cache_mib = sum(path.stat().st_size for path in directory.iterdir()) / 2 ** 20
            training = subprocess.run([sys.executable, "-c", TRAIN, str(directory), json.dumps(image_ids),
                                       str(args.max_cached)], capture_output=True, text=True)
            if training.returncode:
                raise SystemExit(f"bench: SVM training failed:\n{training.stderr}")
            result = json.loads(training.stdout)
            held = result["positives"] + args.max_cached + 2000 + args.regions
            bound_mib = held * args.dim * (4 * CLASSES + 24) / 2 ** 20
            rows.append([images, f"{cache_mib:.0f}", f"{images * args.regions * args.dim * 2 / 2 ** 20:.0f}",
                         f"{(result['peak_kib'] - result['baseline_kib']) / 1024:.0f}",
                         f"{result['traced_peak_bytes'] / 2 ** 20:.0f}", f"{bound_mib:.0f}", result["retrains"]])
    print(f"SVM training (3 classes, {args.regions} regions of dim {args.dim} per image, "
          f"max_cached_negatives {args.max_cached}), peak resident memory above the start of training:\n")
    print(markdown_table(["images", "feature cache on disk (MiB)", "features as float16 (MiB)",
                          "peak resident growth (MiB)", "peak live allocations (MiB)", "bound (MiB)", "retrains"],
                         rows))


if __name__ == "__main__":
    main()
