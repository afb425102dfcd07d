"""`rcnn timing-table`: sliding window vs R-CNN vs SPP-net vs Fast R-CNN vs Faster R-CNN, measured here.

Training time: each method's training stages, from their manifests (shards record when they started
and how long they ran; pipeline.timing.union_seconds counts work that ran side by side once):
    Sliding window  finetune (it applies R-CNN's fine-tuned classifier to a grid of windows)
    R-CNN         finetune, features of the training split, svm, bbox
    SPP-net       sppnet-conv5 and sppnet-features of the training split, sppnet-finetune, -svm, -bbox
    Fast R-CNN    fast-rcnn;  Faster R-CNN: faster-rcnn
Excluded, as in the papers: the classification pre-training (pretrain; ImageNet in the papers) and
selective search. `rcnn timing-table` runs the methods one after another so that their training
does not share the machine; `--fresh` retrains them all for fresh timings.
Test time: this stage times every method on the same `timing.images` test images, decoded into
memory first, after `timing.warmup` images that are not counted, with the device synchronised before
every clock reading: from pixels to detections after NMS, and selective search on the same images.
The report (`reports/<config>/timing-table/`): timing.md with the table beside the published figures,
Fast R-CNN's Table 4 and Faster R-CNN's Table 5, the protocol, timing.json, timing.png.
"""
from __future__ import annotations

import json


from pipeline.cache import StageCache
from pipeline.errors import ConfigError
from pipeline.stage import RunContext, Shard, ShardOutput, Stage

METHOD_NAMES = ("Sliding window", "R-CNN", "SPP-net", "Fast R-CNN", "Faster R-CNN")
WITHOUT_PROPOSALS = ("Sliding window", "Faster R-CNN")  # no selective search in their test time
# method -> (stage, whether only its training-split shards count) of its training; its evaluation stage
TRAINING_STAGES = {
    "Sliding window": [("finetune", False)],
    "R-CNN": [("finetune", False), ("features", True), ("svm", False), ("bbox", False)],
    "SPP-net": [("sppnet-conv5", True), ("sppnet-features", True), ("sppnet-finetune", False),
                ("sppnet-svm", False), ("sppnet-bbox", False)],
    "Fast R-CNN": [("fast-rcnn", False)],
    "Faster R-CNN": [("faster-rcnn", False)],
}
TRAINED_AS = {"Fast R-CNN (SVD)": "Fast R-CNN"}  # a test-time variant of a method trains as that method
EVALUATION_STAGES = {"Sliding window": "sliding-window", "R-CNN": "evaluate", "SPP-net": "sppnet-evaluate", "Fast R-CNN": "fast-rcnn-evaluate",
                     "Faster R-CNN": "faster-rcnn-evaluate"}
# Girshick, "Fast R-CNN" (ICCV 2015), Table 4 (VGG16 = model L, VOC07, Nvidia K40, proposal time excluded);
# Faster R-CNN: Ren et al. (NIPS 2015), Table 5 (VGG16, K40), total 198 ms per image with its own proposals
# and mAP 69.9 (VOC07 trainval, RPN shared); selective search: 1.51 s per image (same table).
PUBLISHED = {
    "Sliding window": {"train_h": None, "test_s": None, "map": None},  # no published figure on VOC07
    "R-CNN": {"train_h": 84.0, "test_s": 47.0, "map": 66.0},
    "SPP-net": {"train_h": 25.0, "test_s": 2.3, "map": 63.1},
    "Fast R-CNN": {"train_h": 9.5, "test_s": 0.32, "map": 66.9},
    "Faster R-CNN": {"train_h": None, "test_s": 0.198, "map": 69.9},
    "Fast R-CNN (SVD)": {"train_h": 9.5, "test_s": 0.22, "map": 66.6},
}
PUBLISHED_SELECTIVE_SEARCH_S = 1.51
FAST_RCNN_TABLE4 = (
    "| | Fast R-CNN S | Fast R-CNN M | Fast R-CNN L | R-CNN S | R-CNN M | R-CNN L | SPP-net L |\n"
    "|---|---|---|---|---|---|---|---|\n"
    "| train time (h) | 1.2 | 2.0 | 9.5 | 22 | 28 | 84 | 25 |\n"
    "| train speedup | 18.3x | 14.0x | 8.8x | 1x | 1x | 1x | 3.4x |\n"
    "| test rate (s/im) | 0.10 | 0.15 | 0.32 | 9.8 | 12.1 | 47.0 | 2.3 |\n"
    "| with SVD | 0.06 | 0.08 | 0.22 | - | - | - | - |\n"
    "| test speedup | 98x | 80x | 146x | 1x | 1x | 1x | 20x |\n"
    "| with SVD | 169x | 150x | 213x | - | - | - | - |\n"
    "| VOC07 mAP | 57.1 | 59.2 | 66.9 | 58.5 | 60.2 | 66.0 | 63.1 |\n"
    "| with SVD | 56.5 | 58.7 | 66.6 | - | - | - | - |\n")
FASTER_RCNN_TABLE5 = (
    "| model | system | conv (ms) | proposal (ms) | region-wise (ms) | total (ms) | rate |\n"
    "|---|---|---|---|---|---|---|\n"
    "| VGG | SS + Fast R-CNN | 146 | 1510 | 174 | 1830 | 0.5 fps |\n"
    "| VGG | RPN + Fast R-CNN | 141 | 10 | 47 | 198 | 5 fps |\n"
    "| ZF | RPN + Fast R-CNN | 31 | 3 | 25 | 59 | 17 fps |\n")


class TimingTable(Stage):
    """Train and test R-CNN, SPP-net, Fast and Faster R-CNN on the same data and hardware; compare."""

    name = "timing-table"
    version = "2"
    shard_suffix = ".json"
    headline_metrics = ("fast_rcnn_train_speedup", "fast_rcnn_test_speedup")
    runs_on_device = True

    def params(self, config: dict) -> dict:
        return {**config["timing"], "test_split": config["data"]["test_split"]}

    def input_stages(self, config: dict) -> tuple[str, ...]:
        training = [stage for stages in TRAINING_STAGES.values() for stage, _ in stages]
        return ("proposals", *training, *EVALUATION_STAGES.values())

    def key_extras(self, ctx: RunContext) -> dict:
        """Timings belong to a machine: another one (or another thread count) measures again."""
        from pipeline.timing import describe_hardware
        return {"hardware": describe_hardware(ctx.device), "torch_threads": ctx.config["torch_threads"]}

    def shards(self, ctx: RunContext) -> list[Shard]:
        timing = ctx.config["timing"]
        image_ids = ctx.dataset.image_ids(ctx.config["data"]["test_split"])
        return [Shard("00000", tuple(image_ids[:timing["warmup"] + timing["images"]]))]

    def run_shard(self, ctx: RunContext, shard: Shard, inputs: dict, out: ShardOutput) -> dict:
        from stages.timed_detection import time_test_pass
        timing = ctx.config["timing"]
        if len(shard.items) < timing["warmup"] + timing["images"]:
            raise ConfigError(f"timing: {timing['warmup']} warm-up + {timing['images']} timed images asked for, but "
                              f"the test split has {len(shard.items)}; lower timing.images")
        measured = time_test_pass(ctx, inputs, list(shard.items), timing["warmup"])
        out.path.write_text(json.dumps(measured))
        return {}

    def reduce(self, ctx: RunContext, cache: StageCache, records: dict, inputs: dict) -> dict:
        from pipeline.timing import describe_hardware
        measured = json.loads(cache.shard_path("00000").read_text())
        manifests = {stage: upstream.manifest() for stage, upstream in inputs.items()}
        train_split = ctx.config["data"]["train_split"]
        maps = {method: manifests[EVALUATION_STAGES[method]]["metrics"]["map_voc07_11pt"] for method in METHOD_NAMES}
        maps["Fast R-CNN (SVD)"] = manifests["fast-rcnn-evaluate"]["metrics"]["map_voc07_11pt_svd"]
        methods = []
        for method in (*METHOD_NAMES, *TRAINED_AS):
            test_s = measured["methods"][method]["seconds_per_image"]
            proposals_s = 0.0 if method in WITHOUT_PROPOSALS else measured["selective_search_s_per_image"]
            methods.append({"method": method,
                            "train_s": training_seconds(manifests, TRAINING_STAGES[TRAINED_AS.get(method, method)],
                                                        train_split),
                            "test_s_per_image": test_s, "test_s_per_image_with_proposals": test_s + proposals_s,
                            "map": maps[method]})
        table = {"hardware": describe_hardware(ctx.device), "config": ctx.config["config_name"], "methods": methods}
        training_hardware = sorted({manifests[stage].get("hardware", "unknown")
                                    for stages in TRAINING_STAGES.values() for stage, _ in stages})
        write_report(cache.report_dir, table, measured, ctx, training_hardware)
        rcnn, fast = (next(m for m in methods if m["method"] == name) for name in ("R-CNN", "Fast R-CNN"))
        return {"hardware": table["hardware"], "methods": methods,
                "fast_rcnn_train_speedup": rcnn["train_s"] / fast["train_s"],
                "fast_rcnn_test_speedup": rcnn["test_s_per_image"] / fast["test_s_per_image"]}


def training_seconds(manifests: dict[str, dict], stages: list[tuple[str, bool]], train_split: str) -> float:
    """Wall-clock seconds of a method's training stages, from their manifests (see the module docstring)."""
    from pipeline.timing import union_seconds
    intervals = []
    for stage, training_split_only in stages:
        manifest = manifests[stage]
        for shard_id, record in manifest["shards"].items():
            if "started" not in record:
                raise ConfigError(f"{stage}: its manifest predates start times; run `rcnn timing-table --fresh`")
            if not training_split_only or shard_id.startswith(f"{train_split}-"):
                intervals.append((record["started"], record["seconds"]))
        if not training_split_only:
            intervals.append((manifest["timings"]["reduce_started"], manifest["timings"]["reduce_s"]))
    return union_seconds(intervals)


def write_report(report_dir, table: dict, measured: dict, ctx: RunContext, training_hardware: list[str]) -> None:
    """timing.md, timing.json and timing.png."""
    (report_dir / "timing.json").write_text(json.dumps(table, indent=2))
    (report_dir / "timing.md").write_text(markdown_report(table, measured, ctx, training_hardware))
    plot_timing(report_dir / "timing.png", table["methods"])


def markdown_report(table: dict, measured: dict, ctx: RunContext, training_hardware: list[str]) -> str:
    from pipeline.reports import markdown_table
    methods = {m["method"]: m for m in table["methods"]}
    rcnn = methods["R-CNN"]
    rows = []
    for name, m in methods.items():
        published = PUBLISHED[name]
        published_rcnn = PUBLISHED["R-CNN"]
        rows.append([name, m["train_s"], f"{rcnn['train_s'] / m['train_s']:.1f}x", m["test_s_per_image"],
                     f"{rcnn['test_s_per_image'] / m['test_s_per_image']:.1f}x", m["test_s_per_image_with_proposals"],
                     m["map"], _published(published["train_h"]), _ratio(published_rcnn["train_h"], published["train_h"]),
                     _published(published["test_s"]), _ratio(published_rcnn["test_s"], published["test_s"]),
                     _published(published["map"])])
    measured_table = markdown_table(
        ["method", "train (s)", "train speedup", "test (s/image)", "test speedup", "test with proposals (s/image)",
         "mAP (VOC07 11-pt, IoU 0.5)", "paper: train (h)", "paper: train speedup", "paper: test (s/image)",
         "paper: test speedup", "paper: mAP (VOC07)"], rows)
    test_order = [methods[name]["test_s_per_image"] for name in ("R-CNN", "SPP-net", "Fast R-CNN")]
    window = methods["Sliding window"]
    with_proposals = {name: methods[name]["test_s_per_image_with_proposals"] for name in METHOD_NAMES}
    checks = [
        f"- the sliding window, with no proposals, is slower at test than R-CNN with its selective search: "
        f"{'holds' if window['test_s_per_image'] > rcnn['test_s_per_image_with_proposals'] else 'does NOT hold'} "
        f"here; its mAP is {'below' if window['map'] < rcnn['map'] else 'NOT below'} R-CNN's",
        f"- test time, proposals excluded, R-CNN > SPP-net > Fast R-CNN (the papers' order): "
        f"{'holds' if test_order[0] > test_order[1] > test_order[2] else 'does NOT hold'} here",
        f"- Faster R-CNN fastest once proposal time is included: "
        f"{'holds' if min(with_proposals, key=with_proposals.get) == 'Faster R-CNN' else 'does NOT hold'} here",
        f"- Fast R-CNN over R-CNN: training {rcnn['train_s'] / methods['Fast R-CNN']['train_s']:.1f}x faster "
        f"(paper: 8.8x), test {rcnn['test_s_per_image'] / methods['Fast R-CNN']['test_s_per_image']:.1f}x faster "
        f"(paper: 146x)"]
    parts = measured["methods"]
    ss_ms = 1000 * measured["selective_search_s_per_image"]
    fast_parts, faster_parts = parts["Fast R-CNN"]["parts_ms"], parts["Faster R-CNN"]["parts_ms"]
    table5 = markdown_table(["system", "conv (ms)", "proposal (ms)", "region-wise (ms)", "total (ms)", "rate"], [
        ["SS + Fast R-CNN", fast_parts["conv"], ss_ms + fast_parts["proposal"], fast_parts["region-wise"],
         ss_ms + sum(fast_parts.values()), f"{1000 / (ss_ms + sum(fast_parts.values())):.1f} fps"],
        ["RPN + Fast R-CNN (Faster R-CNN)", faster_parts["conv"], faster_parts["proposal"], faster_parts["region-wise"],
         sum(faster_parts.values()), f"{1000 / sum(faster_parts.values()):.1f} fps"]])
    breakdown = markdown_table(["method", "part", "ms per image"], [
        [method, part, ms] for method, result in parts.items() for part, ms in result["parts_ms"].items()])
    fast, svd = methods["Fast R-CNN"], methods["Fast R-CNN (SVD)"]
    table4 = markdown_table(["", "Fast R-CNN", "R-CNN", "SPP-net"], [
        ["train time (s)", fast["train_s"], rcnn["train_s"], methods["SPP-net"]["train_s"]],
        ["train speedup", f"{rcnn['train_s'] / fast['train_s']:.1f}x", "1x",
         f"{rcnn['train_s'] / methods['SPP-net']['train_s']:.1f}x"],
        ["test rate (s/im)", fast["test_s_per_image"], rcnn["test_s_per_image"], methods["SPP-net"]["test_s_per_image"]],
        ["with SVD", svd["test_s_per_image"], "-", "-"],
        ["test speedup", f"{rcnn['test_s_per_image'] / fast['test_s_per_image']:.1f}x", "1x",
         f"{rcnn['test_s_per_image'] / methods['SPP-net']['test_s_per_image']:.1f}x"],
        ["with SVD", f"{rcnn['test_s_per_image'] / svd['test_s_per_image']:.1f}x", "-", "-"],
        ["mAP (VOC07 11-pt, test split)", fast["map"], rcnn["map"], methods["SPP-net"]["map"]],
        ["with SVD", svd["map"], "-", "-"]])
    return "\n".join([
        "# Timing: sliding window vs R-CNN vs SPP-net vs Fast R-CNN vs Faster R-CNN\n",
        f"Measured on **{table['hardware']}** with config **{table['config']}** (data: {ctx.dataset.root}).\n",
        measured_table, *checks, "",
        "## Protocol\n", *protocol(ctx, measured, training_hardware), "",
        "## Fast R-CNN, Table 4 (published; VGG16 = L, VOC07 test, Nvidia K40)\n", FAST_RCNN_TABLE4,
        "Measured here, same rows:\n", table4,
        "## Faster R-CNN, Table 5 (published; K40, ms per image)\n", FASTER_RCNN_TABLE5,
        "Measured here, same columns (proposal = selective search for SS + Fast R-CNN):\n", table5,
        "## Test time by part (ms per image)\n", breakdown])


def protocol(ctx: RunContext, measured: dict, training_hardware: list[str]) -> list[str]:
    import torch
    config, backbone = ctx.config, ctx.config["backbone"]
    threads = "" if ctx.device == "cuda" else f", {torch.get_num_threads()} torch threads"
    return [
        f"- device: {ctx.device}{threads}; dtype float32 for every method at test; training as configured "
        f"(amp: bf16 autocast on cuda when `amp` is on)",
        f"- backbone: {backbone['name']} ({backbone['weights']} weights); R-CNN warps each proposal to "
        f"{backbone['input_size']} px ({config['features']['batch_size']} crops per forward); SPP-net: conv5 at "
        f"shorter sides {config['sppnet']['scales']}, pyramid {config['sppnet']['levels']}; Fast / Faster R-CNN: "
        f"shorter side {config['fast_rcnn']['min_size']} / {config['faster_rcnn']['min_size']}, one image per forward",
        f"- sliding window: windows of sides {config['sliding_window']['sizes']} px, aspect ratios "
        f"{config['sliding_window']['aspect_ratios']}, every {config['sliding_window']['step']} of a window's side, "
        f"through R-CNN's fine-tuned classifier (so its training time is fine-tuning's); no proposals",
        f"- proposals: selective search ({config['proposals']['mode']}), {measured['proposals_per_image']:.0f} per "
        f"image on average, {measured['selective_search_s_per_image']:.3f} s per image measured on the same images "
        f"in this run; Faster R-CNN: its RPN's {config['faster_rcnn']['rpn_post_nms_test']} per image",
        f"- test: {measured['images']} test images after {measured['warmup']} warm-up images (not counted), every "
        f"method on the same images, from decoded pixels to detections after NMS; image decoding and disk I/O "
        f"excluded (images decoded and models loaded before the clocks start); CUDA synchronised before every "
        f"clock reading; 'test' excludes proposal time, 'with proposals' adds selective search",
        f"- training: wall-clock time of each method's training stages (see TRAINING_STAGES in "
        f"stages/timing_table.py), from their manifests, measured when they were computed, on: "
        f"{'; '.join(training_hardware)}; classification pre-training and selective search excluded, as in the papers",
        f"- published figures: Fast R-CNN Table 4 (VGG16, K40; SPP-net with five scales), Faster R-CNN Table 5; "
        f"their 'with proposals' add selective search at {PUBLISHED_SELECTIVE_SEARCH_S} s per image (Table 5)"]


def plot_timing(path, methods: list[dict]) -> None:
    """Training time and test time per image, measured (left) beside the published figures (right)."""
    from pipeline.reports import new_figure, save_figure
    figure = new_figure(11, 7)
    names = [m["method"] for m in methods if m["method"] in METHOD_NAMES]
    published = [n for n in names if PUBLISHED[n]["test_s"] is not None]
    measured = {m["method"]: m for m in methods}
    panels = [
        ("measured: training time (s)", names, [measured[n]["train_s"] for n in names], None),
        ("published: training time (h)", published, [PUBLISHED[n]["train_h"] or 0.0 for n in published], None),
        ("measured: test time per image (s)", names, [measured[n]["test_s_per_image"] for n in names],
         [measured[n]["test_s_per_image_with_proposals"] for n in names]),
        ("published: test time per image (s)", published, [PUBLISHED[n]["test_s"] for n in published],
         [PUBLISHED[n]["test_s"] + (0 if n in WITHOUT_PROPOSALS else PUBLISHED_SELECTIVE_SEARCH_S) for n in published]),
    ]
    for index, (title, names, values, with_proposals) in enumerate(panels):
        axes = figure.add_subplot(2, 2, index + 1)
        if with_proposals:
            axes.bar(names, with_proposals, color="#cccccc", label="with proposal time")
        axes.bar(names, values, color="#4477aa", label="proposal time excluded" if with_proposals else None)
        axes.set(title=title, yscale="log" if with_proposals else "linear")
        axes.tick_params(axis="x", labelsize=8)
        if with_proposals:
            axes.legend(fontsize=7)
    save_figure(figure, path)


def _published(value) -> str:
    return "-" if value is None else f"{value:g}"


def _ratio(reference, value) -> str:
    return "-" if value is None else f"{reference / value:.1f}x"
