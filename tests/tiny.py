"""The settings of the tests' tiny runs, shared by conftest's session fixtures and the test modules."""

SCHEDULER: list[str] = []  # ["--scheduler", SPEC] when the suite runs with --rcnn-scheduler SPEC (conftest)
# R-CNN on the tiny generated set (test_rcnn_pipeline)
TINY = ["pretrain.iterations=24", "pretrain.checkpoint_every=4", "finetune.iterations=24",
        "finetune.checkpoint_every=4", "proposals.max_proposals=80", "features.images_per_shard=2",
        "svm.norm_images=4", "bbox.norm_images=4", "detect.images_per_shard=2", "evaluate.pictures=2"]
STAGES = ["proposals", "pretrain", "finetune", "features", "svm", "bbox", "rcnn-detect", "rcnn-evaluate"]
# every other method and the timing table on top of it (test_methods)
METHOD_TINY = ["sppnet.images_per_shard=4", "sppnet_finetune.iterations=40", "sppnet_finetune.checkpoint_every=10",
               "fast_rcnn.iterations=40", "fast_rcnn.checkpoint_every=10", "fast_rcnn.images_per_shard=3",
               "faster_rcnn.iterations=40", "faster_rcnn.checkpoint_every=10", "faster_rcnn.images_per_shard=3",
               "sliding_window.sizes=[48, 96]", "sliding_window.aspect_ratios=[1.0]", "sliding_window.step=0.5",
               "sliding_window.images_per_shard=3", "timing.images=2", "timing.warmup=1"]


def options(data, cache, reports, *extra_sets):
    """The CLI options of a tiny R-CNN run (plus `extra_sets`, each a KEY=VALUE) on data, cache and reports."""
    sets = [item for value in (*TINY, *extra_sets) for item in ("--set", value)]
    return [*sets, "--data", str(data), "--cache", str(cache), "--reports", str(reports), *SCHEDULER]


def method_options(data, cache, reports):
    """The CLI options of the tiny runs of every method (test_methods' timing run)."""
    return options(data, cache, reports, *METHOD_TINY)
