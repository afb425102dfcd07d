"""`rcnn`: one subcommand per stage, plus `run`, `status`, `data shapes` and `data convert`.

Every stage command runs what it needs upstream, reuses what is cached and resumes what was cut off.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from pipeline.data.convert import TARGETS, convert
from pipeline.data.formats import open_dataset
from pipeline.data.reader import IMAGE_SUFFIXES, ON_BAD_INPUT, read_rgb
from pipeline.data.shapes import FORMATS as SHAPES_FORMATS
from pipeline.data.shapes import write_shapes
from pipeline.engine.config import DEFAULT_PRESET, load_config
from pipeline.engine.errors import BadInputError, ConfigError, UserError
from pipeline.engine.graph import parse_scheduler
from pipeline.engine.interrupt import Interrupted, stopping_on_signals
from pipeline.engine.memory import use_tensor_friendly_malloc
from pipeline.engine.runner import VERIFIED, RunContext, plan_stages, run_in_turn, run_stages
from pipeline.engine.status import plan_each, status_row, verify
from pipeline.explain.page import Scene, write_pictures
from pipeline.explain.segmentation import explain_fcn
from pipeline.methods import METHODS, TASKS
from pipeline.predictions import FORMATS, write_predictions
from pipeline.report_page import write_page
from stages import ALL_TARGETS, ENDS, REGISTRY
from stages.predict import PredictImages, prediction_plans, read_explained, read_predictions
from stages.timing_table import NOT_RETIMED, TimingTable, timing_targets

log = logging.getLogger("rcnn")

SCHEDULER_HELP = ("Dask engine: 'threads' or 'threads:N' (in-process threads; the default), 'local:N' (a "
                  "dask.distributed LocalCluster of N worker processes) or 'tcp://host:port' (an existing "
                  "dask.distributed cluster whose workers see the same --cache and --data paths). "
                  "Default: the config's 'scheduler'.")


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code: 0 done, 2 a one-line error (a traceback with --debug), 130 interrupted
    (SIGINT, Ctrl-C), 143 terminated (SIGTERM)."""
    use_tensor_friendly_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        with stopping_on_signals():
            return args.handler(args)
    except (UserError, OSError) as error:
        if args.debug:
            raise
        print(f"rcnn: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        exit_code = interrupt.exit_code if isinstance(interrupt, Interrupted) else 130
        print(f"rcnn: stopped ({interrupt or 'SIGINT'}); finished shards are kept: run the same command again to "
              f"resume", file=sys.stderr)
        return exit_code


def one_line(error: Exception) -> str:
    """What went wrong, which file, what to do: the message a user sees instead of a traceback."""
    if isinstance(error, BadInputError):
        return f"{error} (to leave such items out, pass --on-bad-input skip)"
    if isinstance(error, UserError):
        return str(error)
    # an OSError: a full disk, a read-only or forbidden folder
    text = f"{error.filename}: {error.strerror}" if error.filename else str(error).splitlines()[0]
    if error.errno == errno.ENOSPC:
        return f"{text} (the disk is full: free some space and run the same command again; finished shards are kept)"
    return f"{text} (run again with --debug to see where)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rcnn", description="The R-CNN family of detectors as a staged, cached, resumable pipeline.",
        epilog="Typical use: `rcnn data shapes --out data/shapes`, then `rcnn run`. "
               "`rcnn COMMAND --help` explains each command's options.")
    parser.set_defaults(log_level=logging.INFO)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                           help="log more detail")
    verbosity.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                           help="log only warnings and errors, not the stage-by-stage lines; progress bars (on a "
                                "terminal) and what a command prints as its result (a run's table of stages, the "
                                "reports' path) still show")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of the one-line message")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="generate a data set, or convert one to another format",
                               description="Generate the synthetic shapes set, or write a data set (VOC, COCO or "
                                           "YOLO) in another of these formats.")
    data_kinds = data.add_subparsers(title="data sets", metavar="KIND", required=True)
    shapes = data_kinds.add_parser(
        "shapes", help="the synthetic shapes set (detection boxes and segmentation masks)",
        description="Write the deterministic synthetic shapes set in the VOC layout: six shape classes, "
                    "1-6 objects per image over textured backgrounds, with occlusion, truncated and "
                    "difficult objects, per-pixel masks and train/val/trainval/test splits. The same seed "
                    "gives the same bytes; an identical set already at --out is left as it is.")
    shapes.add_argument("--out", type=Path, default=Path("data/shapes"), help="output folder (default: data/shapes)")
    shapes.add_argument("--images", type=int, default=400,
                        help="number of images (default: 400, what the demo preset is tuned for)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    shapes.add_argument("--single-object", action="store_true",
                        help="exactly one object per image, never difficult: the data of `rcnn localize` "
                             "(classification + localization); write it to its own --out, e.g. data/shapes-single")
    shapes.add_argument("--format", choices=SHAPES_FORMATS, default="voc",
                        help="voc (the default; with segmentation masks), coco (annotations/instances_<split>.json "
                             "and images/) or yolo (data.yaml, images/, labels/ and a list per split); the same "
                             "images, boxes and splits")
    shapes.set_defaults(handler=command_data_shapes)

    converting = data_kinds.add_parser(
        "convert", help="write the --data set (VOC, COCO or YOLO) in another format",
        description="Read the data set --data names (detected as voc, coco or yolo, or as data.format says) with "
                    "the pipeline's own reader and its checks, and write it to OUT: every split, or those of "
                    "--splits, with the same images (copied), classes and boxes. VOC holds whole pixels, so boxes "
                    "from COCO or YOLO are rounded to the nearest pixel edges; COCO has no truncated flag, YOLO "
                    "no difficult or truncated flag.")
    converting.add_argument("out", type=Path, metavar="OUT", help="a new folder for the converted data set")
    converting.add_argument("--to", choices=TARGETS, required=True, help="the format to write")
    converting.add_argument("--splits", nargs="+", metavar="SPLIT",
                            help="the splits to write (default: every split the data set has)")
    add_data_options(converting)
    converting.set_defaults(handler=command_data_convert)

    for stage in REGISTRY.values():
        summary = (stage.__doc__ or sys.modules[type(stage).__module__].__doc__ or stage.name).strip().splitlines()[0]
        if getattr(stage, "prefix", ""):
            summary += f" The {stage.prefix.rstrip('-')} copy of the {stage.base_name} stage, on its inputs."
        if getattr(stage, "method", None):
            summary += f" ({stage.method.title}.)"
        stage_parser = commands.add_parser(stage.name, help=summary, description=(
            f"{summary} Runs the stages it reads from first when they are not cached, reuses what is "
            f"cached and resumes from the first missing shard after an interruption."))
        add_common_options(stage_parser, force_help="recompute these stages even if cached (no names: this stage)")
        stage_parser.set_defaults(handler=command_run, targets=[stage.name])
        if stage.name == "timing-table":
            stage_parser.description += (
                " Runs the methods one after another (each method's own graph through Dask), so that their "
                "training does not share the machine, then times their test pass on the same images.")
            stage_parser.add_argument("--fresh", action="store_true",
                                      help="retrain and re-time every method (all but proposals and pretrain, "
                                           "which no method's time includes) instead of reusing cached stages")
            stage_parser.add_argument("--test-only", action="store_true",
                                      help="train nothing: time each method's test pass at the config's scale on "
                                           "untrained models (ImageNet or random weights) with its multiply-adds, "
                                           "beside the papers' tables; no mAP (stage timing-test-only)")
            stage_parser.add_argument("--images", type=int, metavar="N",
                                      help="time on the first N test images (default: the config's timing.images)")
            stage_parser.set_defaults(handler=command_timing_table)

    run = commands.add_parser("run", help="run a method's whole pipeline through one Dask graph",
                              description="Run the pipeline of each method named (default: R-CNN) through one "
                                          "Dask graph, reusing cached stages and resuming interrupted ones; "
                                          "prints where the reports are.")
    add_common_options(run, force_help="recompute these stages even if cached (no names: every stage run)")
    run.add_argument("--methods", nargs="+", choices=[*METHODS, *TASKS, "all"], default=["rcnn"], metavar="METHOD",
                     help=f"the detection methods to run: {', '.join(METHODS)}; the other tasks on the same data: "
                          f"fcn (semantic segmentation), localize (single-object data only); or all (every one but "
                          f"localize; default: rcnn)")
    run.set_defaults(handler=command_run, targets=None)

    status = commands.add_parser("status", help="what is cached, stale, partial or missing",
                                 description="List each stage as cached (its current key is complete), "
                                             "partial (some shards done), running (another run holds its "
                                             "lock), stale (only results for other params or data exist) "
                                             "or missing, with its key and size.")
    add_common_options(status, force_help=None)
    status.add_argument("--json", action="store_true", help="print JSON, including each stage's metrics")
    status.set_defaults(handler=command_status)

    verify = commands.add_parser(
        "verify", help="check cached outputs against their records; forget what differs",
        description="Hash every shard file of the named stages (default: every stage of this config and data) "
                    "and compare it with the size and sha256 its record holds. A shard whose file is missing, "
                    "truncated or changed is forgotten (its record, its file and the stage's manifest), so that "
                    "the next run recomputes exactly those shards. `rcnn run` checks the outputs it is about to "
                    "read the same way; `rcnn status` marks outputs that fail the check as partial.")
    verify.add_argument("stages", nargs="*", metavar="STAGE", help="the stages to check (default: all)")
    add_common_options(verify, force_help=None)
    verify.set_defaults(handler=command_verify)

    add_predict_parser(commands)
    add_explain_parser(commands)
    return parser


def add_predict_parser(commands) -> None:
    predict = commands.add_parser(
        "predict", help="a trained detector's boxes on your own images",
        description="Run a trained method's detector (the one its detect stage evaluates) on images outside the "
                    "data set: per image <stem>.json (class, score, box corners in pixels) and <stem>.jpg with the "
                    "boxes drawn, in --out. The model is the one --config, --set and --data name, read from the "
                    "cache; proposals and detections are cached by image content.")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                         help="an image (jpg, jpeg, png) or a folder of them (not searched recursively)")
    predict.add_argument("--method", choices=list(METHODS), default="rcnn",
                         help="the detection method to apply (default: rcnn)")
    add_common_options(predict, force_help=None)
    predict.add_argument("--out", type=Path, default=Path("predictions"),
                         help="where the files go (default: predictions/)")
    predict.add_argument("--score-threshold", type=float, metavar="SCORE",
                         help="keep and draw detections scoring at least this (default: the method's: 0 for the SVM "
                              "margins of rcnn and sppnet, 0.5 for the probabilities of the others)")
    predict.add_argument("--format", action="append", choices=FORMATS, default=[],
                         help="also write voc (Annotations/<stem>.xml, pre-labels for an annotation tool) or coco "
                              "(detections.json in the COCO results format, images.json beside it); repeatable")
    add_train_option(predict)
    predict.set_defaults(handler=command_predict)


def add_explain_parser(commands) -> None:
    explain = commands.add_parser(
        "explain", help="the lecture's pictures of each step of a method, on your images",
        description="Draw each step of a trained method on the images given, from what the pipeline computes for "
                    "them: proposals, the warped regions the CNN sees, SVM scores before and after NMS, hard "
                    "negatives, box regression, RoI pooling on the feature map, anchors and the RPN, ... Writes "
                    "<reports>/<config>/explain/<image>/index.html and its pictures; explaining another method on "
                    "the same image adds to that page. Intermediate results are cached by image content.")
    explain.add_argument("images", nargs="+", metavar="IMAGE",
                         help="an image id of the test split (its ground truth is drawn too), an image file "
                              "(jpg, jpeg, png) or a folder of them")
    explain.add_argument("--method", choices=[*METHODS, "fcn"], default="rcnn",
                         help="the detection method whose steps to draw, or fcn: the lecture's upsampling examples "
                              "and each trained FCN upsampling variant's mask on the image (default: rcnn)")
    add_common_options(explain, force_help=None)
    add_train_option(explain)
    explain.set_defaults(handler=command_explain)


def add_train_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", action="store_true",
                        help="train the method first when it is not cached (otherwise that is an error)")


def add_common_options(parser: argparse.ArgumentParser, force_help: str | None) -> None:
    add_data_options(parser)
    parser.add_argument("--cache", type=Path, metavar="DIR", help="the cache folder (default: cache_dir)")
    parser.add_argument("--reports", type=Path, metavar="DIR",
                        help="where reports go, as DIR/<config name>/<stage>/ (default: reports_dir)")
    parser.add_argument("--scheduler", metavar="SPEC", help=SCHEDULER_HELP)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where the networks run: cuda when one is visible (auto), or cpu/cuda explicitly "
                             "(default: the config's device)")
    if force_help:
        parser.add_argument("--force", nargs="*", metavar="STAGE", default=None, help=force_help)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which config and which data set: every command that reads the data set has them."""
    parser.add_argument("--config", default=None, metavar="NAME|PATH",
                        help=f"a preset in configs/ (demo, photos, voc2007) or a YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set proposals.max_proposals=300 (repeatable; "
                             "the value is read as YAML)")
    parser.add_argument("--data", type=Path, metavar="PATH",
                        help="the data set: a VOC, COCO or YOLO folder, a COCO .json file (the training split) or a "
                             "YOLO data.yaml; the format is detected unless data.format names it (default: data.root)")
    parser.add_argument("--on-bad-input", choices=ON_BAD_INPUT,
                        help="on an unreadable image or bad annotation: stop with an error naming the file, "
                             "or skip the item and list it in the stage report (default: data.on_bad_input)")


def load_data_config(args) -> dict:
    """The config with --data and --on-bad-input applied to its data section."""
    config = load_config(args.config, args.set)
    for key in ("data", "cache_dir", "reports_dir", "scheduler"):
        if key not in config:
            raise ConfigError(f"config {config['config_name']}: missing the top-level key {key!r}")
    data = config["data"]
    if args.data:
        data["root"] = str(args.data)
    if args.on_bad_input:
        data["on_bad_input"] = args.on_bad_input
    return config


def make_context(args) -> RunContext:
    config = load_data_config(args)
    config["cache_dir"] = str(args.cache or config["cache_dir"])
    config["reports_dir"] = str(args.reports or config["reports_dir"])
    config["scheduler"] = args.scheduler or config["scheduler"]
    config["device"] = args.device or config.get("device", "auto")
    parse_scheduler(config["scheduler"])  # a bad spec fails now, before any planning
    dataset = open_dataset(config["data"])
    # reports/<config name>/<stage>/: runs of different configs keep their own reports side by side
    ctx = RunContext(config, dataset, Path(config["cache_dir"]), Path(config["reports_dir"]) / config["config_name"])
    if config["device"] != "auto":
        ctx.device  # an unusable --device fails now, before any planning
    return ctx


def command_data_shapes(args) -> int:
    written = write_shapes(args.out, args.images, args.seed, args.single_object, args.format)
    print(f"{'wrote' if written else 'up to date:'} {args.images} images to {args.out}"
          f"{'' if args.format == 'voc' else f' ({args.format})'}")
    return 0


def command_data_convert(args) -> int:
    dataset = open_dataset(load_data_config(args)["data"])
    written = convert(dataset, args.out, args.to, args.splits)
    for path, problem in dataset.skipped.items():
        print(f"skipped {path}: {problem}")
    splits = ", ".join(f"{split} {count}" for split, count in written["splits"].items())
    print(f"wrote {written['images']} images, {written['objects']} objects, {len(dataset.classes)} classes to "
          f"{args.out} ({args.to}; images per split: {splits})")
    return 0


def command_run(args) -> int:
    ctx = make_context(args)
    everything = [name for name in ENDS if name != "localize"]  # localize needs single-object data
    train_split = ctx.config["data"]["train_split"]
    if not args.targets and "all" in args.methods and not ctx.dataset.has_segmentation(train_split):
        missing = (f"{ctx.dataset.segmentation_split_file(train_split)} is missing" if ctx.dataset.format == "voc"
                   else f"{ctx.dataset.format.upper()} files hold none")
        print(f"fcn left out: this data set has no segmentation masks ({missing})")
        everything.remove("fcn")
    targets = args.targets or [ENDS[name] for name in (everything if "all" in args.methods else args.methods)]
    plans = plan_stages(targets, REGISTRY, ctx)
    force = set()
    if args.force is not None:
        everything = {plan.stage.name for plan in plans} if args.targets is None else set(targets)
        force = set(args.force) or everything  # no names: every stage of `rcnn run`, or the stage named
        unknown = force - {plan.stage.name for plan in plans}
        if unknown:
            raise ConfigError(f"--force {' '.join(sorted(unknown))}: not a stage of this command "
                              f"(stages: {', '.join(plan.stage.name for plan in plans)})")
    print_summaries(run_stages(plans, ctx, ctx.config["scheduler"], force))
    write_report_page(ctx)
    print(f"reports: {ctx.reports_root.resolve()}")
    return 0


def command_timing_table(args) -> int:
    """Each method's graph in turn (so that no two methods train at once), then the timed test pass;
    with --test-only, the untrained test passes alone."""
    if args.images is not None:
        args.set.append(f"timing.images={args.images}")
    if args.test_only:  # the stage itself refuses backbone.weights: pretrain before anything is trained
        args.targets = ["timing-test-only"]
        command_run(args)
        report = make_context(args).reports_root / "timing-test-only"
        print(f"\n{(report / 'timing.md').read_text().split('## Time and multiply-adds')[0]}")
        return 0
    ctx = make_context(args)
    forced = set() if args.force is None else set(args.force) or {TimingTable.name}  # no names: this stage
    if forced - set(REGISTRY):
        raise ConfigError(f"--force {' '.join(sorted(forced - set(REGISTRY)))}: no such stage "
                          f"(stages: {', '.join(REGISTRY)})")

    def force_of(names: set[str]) -> set[str]:
        return names - set(NOT_RETIMED) if args.fresh else forced & names
    for target, summaries in run_in_turn(timing_targets(), REGISTRY, ctx, ctx.config["scheduler"], force_of):
        print_summaries([summary for summary in summaries if summary["computed"] or summary["stage"] == target])
    write_report_page(ctx)
    report = ctx.reports_root / "timing-table"
    print(f"\n{(report / 'timing.md').read_text().split('## Protocol')[0]}")
    print(f"report: {report.resolve()}")
    return 0


def command_predict(args) -> int:
    on_bad_input, args.on_bad_input = args.on_bad_input, None  # for the images given, not the model's data set
    ctx = make_context(args)
    method = METHODS[args.method]
    images = PredictImages(image_paths(args.paths), on_bad_input or ctx.config["data"]["on_bad_input"])
    plans = run_on_images(args, ctx, method, images, explain=False)
    predict = plans[-1]
    metrics = predict.cache.manifest()["metrics"]
    about = {"method": method.name, "config": ctx.config["config_name"], "key": predict.key}
    threshold = method.score_threshold if args.score_threshold is None else args.score_threshold
    written = write_predictions(args.out, [(path, digest) for digest, path in images.path_of.items()],
                                read_predictions(predict.cache), metrics["classes"], about, threshold,
                                tuple(args.format))
    for path, problem in metrics["skipped"].items():
        print(f"skipped {path}: {problem}")
    print(f"{method.title}: {written} images, {metrics['seconds_per_image']:.3f} s per image (detector, without "
          f"proposals); score >= {threshold:g} kept; files in {args.out.resolve()}")
    return 0


def command_explain(args) -> int:
    on_bad_input, args.on_bad_input = args.on_bad_input, None  # for the images given, not the model's data set
    ctx = make_context(args)
    named = explained_images(args.images, ctx)  # stem -> (path, ground truth or None)
    if args.method == "fcn":
        return explain_segmentation(args, ctx, named)
    method = METHODS[args.method]
    images = PredictImages([path for path, _ in named.values()], on_bad_input or ctx.config["data"]["on_bad_input"])
    plans = run_on_images(args, ctx, method, images, explain=True)
    explained, by_name = plans[-1], {plan.stage.name: plan for plan in plans}
    metrics = explained.cache.manifest()["metrics"]
    trained = {role: by_name[stage].cache for role, stage in method.model_stages.items()}
    params = {**explained.context.params, "score_threshold": method.score_threshold}
    for path, problem in metrics["skipped"].items():
        print(f"skipped {path}: {problem}")
    for stem, (path, ground_truth) in named.items():
        if str(path) in metrics["skipped"]:
            continue
        scene = Scene(read_rgb(path), read_explained(explained.cache, images.digest_of[path]), metrics["classes"],
                      ground_truth, trained, ctx.dataset, params)
        page = write_pictures(ctx.reports_root / "explain" / stem, method.name, method.explainer.title,
                              {"image": str(path), "config": ctx.config["config_name"], "key": explained.key},
                              method.explainer.draw(scene))
        print(f"{stem}: {page.resolve()}")
    write_report_page(ctx)
    return 0


def explain_segmentation(args, ctx: RunContext, named: dict) -> int:
    """`rcnn explain --method fcn`: the worked examples and every trained upsampling variant on each image."""
    if args.train and ctx.dataset.has_segmentation(ctx.splits["train"]):
        print_summaries(run_stages(plan_stages(["fcn-train"], REGISTRY, ctx), ctx, ctx.config["scheduler"]))
    elif args.train:
        print("fcn: this data set has no segmentation masks to train on: the worked examples only")
    test = ctx.splits["test"]
    masked = set(ctx.dataset.segmentation_ids(test)) if ctx.dataset.has_segmentation(test) else set()
    for stem, (path, ground_truth) in named.items():  # a test image (it has ground truth) may have a mask
        truth = ctx.dataset.read_segmentation(stem) if ground_truth is not None and stem in masked else None
        title, pictures = explain_fcn(ctx, REGISTRY, read_rgb(path), truth)
        page = write_pictures(ctx.reports_root / "explain" / stem, "fcn", title,
                              {"image": str(path), "config": ctx.config["config_name"]}, pictures)
        print(f"{stem}: {page.resolve()}")
    write_report_page(ctx)
    return 0


def explained_images(names: list[str], ctx: RunContext) -> dict[str, tuple[Path, tuple | None]]:
    """stem -> (image path, (boxes, class indices) of its ground truth or None) of what `rcnn explain` was
    given: ids of the test split (with their ground truth), image files and folders (without)."""
    test_ids = set(ctx.dataset.image_ids(ctx.splits["test"]))
    named, files = {}, []
    for name in names:
        if Path(name).exists():
            files.append(Path(name))
        elif name in test_ids:
            boxes, labels, difficult = ctx.dataset.ground_truth(name)
            named[name] = (ctx.dataset.image_path(name), (boxes[~difficult], labels[~difficult]))
        else:
            raise UserError(f"{name}: neither an image id of the test split ({ctx.splits['test']}) nor an image "
                            f"file or folder")
    for path in image_paths(files) if files else []:
        if path.stem in named:
            raise UserError(f"{path} and the test image {path.stem} would share explain/{path.stem}/: explain them "
                            f"in separate runs")
        named[path.stem] = (path, None)
    return named


def run_on_images(args, ctx: RunContext, method, images: PredictImages, explain: bool) -> list:
    """Run `<method>-predict` (or `-explain`) on the images, with what it needs; returns the plans, its own last.
    Without --train, a method whose trained stages are not all cached is a one-line error saying how to train it."""
    plans, untrained = prediction_plans(method, images, REGISTRY, ctx, explain)
    if untrained and not args.train:
        raise UserError(f"{method.title} is not trained for this config and data ({', '.join(untrained)} not cached); "
                        f"train it with `{rerun_command(args, method.name)}`, or pass --train")
    summaries = run_stages(plans, ctx, ctx.config["scheduler"])
    print_summaries([summary for summary in summaries if summary["computed"] or summary["stage"] not in REGISTRY],
                    {plan.stage.name: plan.stage for plan in plans})
    return plans


def image_paths(paths: list[Path]) -> list[Path]:
    """The images named, folders expanded (jpg, jpeg, png, sorted); a one-line error for anything else."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such image or folder")
    if not found:
        raise UserError(f"{' '.join(map(str, paths))}: no images (jpg, jpeg, png) found")
    stems = [path.stem for path in found]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise UserError(f"several images are named {twice[0]}: their output files would overwrite each other; "
                        f"predict them in separate runs with separate --out folders")
    return found


def rerun_command(args, methods: str) -> str:
    """`rcnn run --methods ...` with the config, data and overrides of this command."""
    options = [f"--config {args.config}"] if args.config else []
    options += [f"--set {item}" for item in args.set] + ([f"--data {args.data}"] if args.data else [])
    options += [f"--cache {args.cache}"] if args.cache else []
    return " ".join(["rcnn run --methods", methods, *options])


def print_summaries(summaries: list[dict], registry: dict = REGISTRY) -> None:
    for summary in summaries:
        stage = registry[summary["stage"]]
        headline = " ".join(f"{name}={_short(summary['metrics'][name])}"
                            for name in stage.headline_metrics if name in summary["metrics"])
        state = "computed" if summary["computed"] else "cached"
        print(f"{summary['stage']:<24} {state:<9} {summary['key']}  {headline}")


def write_report_page(ctx: RunContext) -> Path | None:
    """Rebuild reports/<config>/index.html (pipeline.report_page) from every stage's status, as `rcnn status` sees
    it without hashing the shards; every command that publishes reports calls it last. The page says which parts it
    could not read; one it cannot write at all is a warning, never a failed command. Returns its path, if written."""
    about = {"config": ctx.config["config_name"], "data": str(ctx.dataset.root), "cache": str(ctx.cache_root)}
    rows = []
    try:
        plans, unavailable = plan_each(ALL_TARGETS, REGISTRY, ctx)
        rows = [status_row(plan, memo=None) for plan in plans] + unavailable
    except UserError as error:
        about["problem"] = str(error)
    try:
        return write_page(ctx.reports_root, ctx.cache_root, rows,
                          {name: stage.headline_metrics for name, stage in REGISTRY.items()}, about)
    except OSError as error:
        log.warning("the report page was not written: %s", one_line(error))
        return None


def command_status(args) -> int:
    ctx = make_context(args)
    plans, unavailable = plan_each(ALL_TARGETS, REGISTRY, ctx)
    rows = [status_row(plan, ctx.cache_root / VERIFIED) for plan in plans] + unavailable
    if args.json:
        print(json.dumps({"config": ctx.config["config_name"], "data": str(ctx.dataset.root),
                          "cache": str(ctx.cache_root), "stages": rows}, indent=2))
        return 0
    print(f"{'stage':<24} {'state':<8} {'key':<16}  {'size':>9}  shards")
    for row in rows:
        if row["state"] == "n/a":
            print(f"{row['stage']:<24} n/a      {row['reason']}")
            continue
        print(f"{row['stage']:<24} {row['state']:<8} {row['key']:<16}  {_size(row['size_bytes']):>9}  "
              f"{row['shards_done']}/{row['shards']}")
        for problem in row["problems"]:
            print(f"    {problem} (run `rcnn verify {row['stage']}`)")
    return 0


def command_verify(args) -> int:
    """Check every shard of the named stages (default: all) against its record, and forget the bad ones."""
    ctx = make_context(args)
    plans = [plan for plan in plan_each(ALL_TARGETS, REGISTRY, ctx)[0]
             if not args.stages or plan.stage.name in args.stages]
    unknown = set(args.stages) - {plan.stage.name for plan in plans}
    if unknown:
        raise ConfigError(f"rcnn verify {' '.join(sorted(unknown))}: no such stage (stages: {', '.join(REGISTRY)})")
    forgotten = 0
    for plan in plans:
        done, bad_shards, manifest_problem = verify(plan)
        if not done and not manifest_problem:
            continue
        forgotten += len(bad_shards)
        print(f"{plan.stage.name:<24} {plan.key}  {done} of {len(plan.shards)} shards done, "
              f"{done - len(bad_shards)} match their records")
        for problem in [*bad_shards.values(), *filter(None, [manifest_problem])]:
            print(f"    {problem}: forgotten; the next run recomputes it")
    print(f"{forgotten} shards forgotten" if forgotten else "every shard matches its record")
    return 0


def _short(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _size(size_bytes: float) -> str:
    if size_bytes < 1024:
        return f"{size_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size_bytes /= 1024
        if size_bytes < 1024 or unit == "GiB":
            return f"{size_bytes:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(main())
