"""reports/<config>/index.html: one static page of a run, rebuilt after every command that writes reports.

It shows what `rcnn status --json` knows (each stage's state, key, time and headline metrics), each detection
method's mAP tables (from its evaluate stage's manifest metrics, never parsed from markdown) with its PR curves
and detection pictures, the timing table and its plot, the other tasks' results (the FCN's, localization's),
and links to every explain page (reports/<config>/explain/<stem>/index.html). It is plain HTML with inline CSS
and relative links: it opens from a file URL, with no network and no script.

The sections come from the method records (pipeline.methods: METHODS, TASKS) and the stages' status rows;
no method has code of its own here. Pictures and files are shown from a stage's published report
(reports/<config>/<stage>/) only when that report is the one of the stage's current output (the files the
cache's report holds, of the same sizes): a report left by a run with other settings is named as such.
A part whose records or files cannot be read says so in its place; the rest of the page is still written.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from pipeline.coco import COCO_TITLES
from pipeline.engine.cache import StageCache, commit_file, naming_the_file, temporary_path
from pipeline.methods import METHODS, TASKS, Method

PAGE = "index.html"
EXPLAIN = "explain"             # reports/<config>/explain/<stem>/index.html: `rcnn explain`'s pages
TIMING_STAGE = "timing-table"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
GALLERY_LIMIT = 24              # pictures shown per folder; the rest are counted
METRIC_LABELS = {"map_voc07_11pt": "VOC07 11-point", "map_all_point": "all-point"}


class Unreadable(Exception):
    """A record or file the page needs that cannot be read or has another shape: its part of the page says so."""


def write_page(reports_root: Path, cache_root: Path, rows: list[dict], headlines: Mapping[str, Sequence[str]],
               about: Mapping[str, str]) -> Path:
    """Write reports_root/index.html atomically and return its path. rows: the status rows of every stage
    (pipeline.engine.status.status_row, and the "n/a" rows of plan_each); headlines: stage -> the names of its
    headline metrics; about: what the header says of the run (config, data, ...; "problem" when the stages
    could not be planned)."""
    reports_root.mkdir(parents=True, exist_ok=True)
    page = reports_root / PAGE
    temporary = temporary_path(page)
    try:
        with naming_the_file(page):
            temporary.write_text(build_page(reports_root, cache_root, rows, headlines, about), encoding="utf-8")
        commit_file(temporary, page)
    finally:
        temporary.unlink(missing_ok=True)
    return page


def build_page(reports_root: Path, cache_root: Path, rows: list[dict], headlines: Mapping[str, Sequence[str]],
               about: Mapping[str, str]) -> str:
    report = Reports(reports_root, cache_root, {row["stage"]: row for row in rows})
    sections = [("stages", "Stages", stages_section(report, rows, headlines, about.get("problem")))]
    sections += [(method.name, method.title, method_section(report, method)) for method in METHODS.values()]
    sections.append(("timing", "Timing table", timing_section(report)))
    sections += [(task, task if task == stage else f"{task} ({stage})",
                  task_section(report, task, stage, headlines.get(stage, ()))) for task, stage in TASKS.items()]
    sections.append(("explain", "Explained images", explain_section(reports_root)))
    contents = " · ".join(f'<a href="#{esc(anchor)}">{esc(title)}</a>' for anchor, title, _ in sections)
    header = " · ".join(f"{esc(name)}: <code>{esc(value)}</code>" for name, value in about.items() if name != "problem")
    body = "\n".join(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{text}</section>'
                     for anchor, title, text in sections)
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config = esc(about.get("config", reports_root.name))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>rcnn report: {config}</title>\n<style>{STYLE}</style></head>\n'
            f'<body>\n<h1>Run report: {config}</h1>\n'
            f'<p class="about">{header} · written {esc(written)}</p>\n<nav>{contents}</nav>\n{body}\n</body></html>\n')


class Reports:
    """What the page reads of a run: the status rows, the stages' manifests and their published reports."""

    def __init__(self, reports_root: Path, cache_root: Path, rows: dict[str, dict]):
        self.root, self.cache_root, self.rows = reports_root, cache_root, rows
        self._current: dict[str, bool] = {}

    def manifest(self, stage: str) -> dict:
        row = self.rows[stage]
        try:
            return StageCache(self.cache_root, stage, row["key"]).manifest()
        except (OSError, ValueError) as error:
            raise Unreadable(f"the manifest of {stage} ({row['key']}): {error}") from None

    def current(self, stage: str) -> bool:
        """Whether reports/<config>/<stage>/ is the report of the stage's current, cached output: it holds every
        file the cached report holds, of the same size (a report published by a run with other settings or data
        has other files or sizes)."""
        if stage not in self._current:
            self._current[stage] = self._is_current(stage)
        return self._current[stage]

    def _is_current(self, stage: str) -> bool:
        row, published = self.rows.get(stage), self.root / stage
        if not row or row["state"] != "cached" or not published.is_dir():
            return False
        cached = StageCache(self.cache_root, stage, row["key"]).report_dir
        if not cached.is_dir():
            return False
        for path in cached.rglob("*"):
            copy = published / path.relative_to(cached)
            if path.is_file() and not (copy.is_file() and copy.stat().st_size == path.stat().st_size):
                return False
        return True

    def files(self, stage: str) -> list[Path]:
        """The files at the top of the stage's published report, sorted (empty when none is published)."""
        folder = self.root / stage
        return sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []

    def link(self, path: Path) -> str:
        """The URL of a file under the reports folder, relative to the page."""
        return quote(path.relative_to(self.root).as_posix())


# ---- the stages ------------------------------------------------------------------------------------------
def stages_section(report: Reports, rows: list[dict], headlines: Mapping[str, Sequence[str]],
                   problem: str | None) -> str:
    if problem:
        return f'<p class="problem">The stages could not be planned: {esc(problem)}</p>'
    lines = []
    for row in rows:
        if row["state"] == "n/a":
            lines.append([esc(row["stage"]), state_cell("n/a"), "", "", esc(row["reason"]), ""])
            continue
        shards = f' {row["shards_done"]}/{row["shards"]} shards' if row["state"] in ("partial", "running") else ""
        problems = "".join(f'<br><span class="problem">{esc(problem)}</span>' for problem in row["problems"])
        lines.append([esc(row["stage"]), state_cell(row["state"]) + esc(shards), f"<code>{esc(row['key'])}</code>",
                      stage_time(report, row), headline(row, headlines.get(row["stage"], ())) + problems,
                      report_links(report, row["stage"])])
    return html_table(["stage", "state", "key", "time", "headline metrics", "report"], lines, escaped=True)


def stage_time(report: Reports, row: dict) -> str:
    """The wall-clock time the stage's output took (its manifest's timings), with when it finished."""
    if row["state"] != "cached":
        return ""
    try:
        manifest = report.manifest(row["stage"])
        seconds = field(manifest["timings"], "wall_s", (int, float))
    except Unreadable as problem:
        return f'<span class="problem" title="{esc(problem)}">unreadable</span>'
    return f'<span title="finished {esc(manifest.get("finished", "?"))}">{esc(duration(seconds))}</span>'


def headline(row: dict, names: Sequence[str]) -> str:
    metrics = row.get("metrics", {})
    return esc(" ".join(f"{name}={number(metrics[name])}" for name in names if name in metrics))


def report_links(report: Reports, stage: str) -> str:
    files = report.files(stage)
    if not files:
        return ""
    links = " ".join(f'<a href="{report.link(path)}">{esc(path.name)}</a>' for path in files)
    return links if report.current(stage) else f'<span class="old" title="{OLD_REPORT}">(other run)</span> {links}'


OLD_REPORT = "published by a run with other settings or data: rerun the stage to refresh it"


# ---- a detection method: its evaluation's tables and pictures ------------------------------------------------
def method_section(report: Reports, method: Method) -> str:
    stage = method.evaluate_stage
    missing = not_cached(report, stage, f"rcnn run --methods {method.name}")
    if missing:
        return missing
    text = guarded(map_tables, method, report.rows[stage]["metrics"])
    text += pictures(report, stage)
    for training in dict.fromkeys(method.training_stages):
        if report.current(training) and any(is_image(path) for path in report.files(training)):
            text += f"<h3>Training: {esc(training)}</h3>\n" + pictures(report, training, folders=False)
    return text


def map_tables(method: Method, metrics: dict) -> str:
    """mAP of every variant, the result against each variant (paired bootstrap), AP per class, COCO AP."""
    titles = {variant.name: variant.title for variant in method.variants}
    variants = in_order(field(metrics, "variants", dict), titles)
    columns = sorted(next(iter(variants.values()), {}), key=column_order)
    text = "<h3>mAP by variant</h3>\n" + html_table(
        ["variant", *(metric_label(column) for column in columns)],
        [[titles.get(name, name), *(number(by_metric.get(column)) for column in columns)]
         for name, by_metric in variants.items()])
    differences = in_order(field(metrics, "differences", dict), titles)
    if differences:
        ious = list(next(iter(differences.values())))
        text += (f"<h3>{esc(method.variants[0].title)} against each variant</h3>\n<p>The result's all-point mAP minus "
                 f"the variant's, with a 95 % interval from a paired bootstrap over the test images.</p>\n"
                 + html_table(["compared with", *(f"difference in mAP@{iou}" for iou in ious)],
                              [[titles.get(name, name), *(interval(by_iou.get(iou)) for iou in ious)]
                               for name, by_iou in differences.items()]))
    per_class = field(metrics, "ap_voc07_11pt", dict)
    text += (f"<h3>AP per class at IoU {field(metrics, 'iou', (int, float)):g}: {esc(method.variants[0].title)}</h3>\n"
             + html_table(["class", "AP (VOC07 11-point)"], [[name, number(ap)] for name, ap in per_class.items()]))
    coco = metrics.get("coco")
    if isinstance(coco, dict) and coco:
        coco = in_order(coco, titles)
        names = list(next(iter(coco.values())))
        text += "<h3>COCO-style AP</h3>\n" + html_table(
            ["variant", *(COCO_TITLES.get(name, name) for name in names)],
            [[titles.get(name, name), *(number(result.get(n)) for n in names)] for name, result in coco.items()])
    warnings = metrics.get("warnings") or []
    text += "".join(f'<p class="problem">{esc(warning)}</p>\n' for warning in warnings)
    return text


def in_order(by_variant: dict, titles: dict[str, str]) -> dict:
    """The variants in the method record's order (any the record does not name last)."""
    return {name: by_variant[name] for name in [*titles, *by_variant] if name in by_variant}


def column_order(column: str) -> tuple:
    """By IoU, then in METRIC_LABELS' order: map_voc07_11pt@0.5, map_all_point@0.5, map_voc07_11pt@0.7, ..."""
    name, _, iou = column.partition("@")
    return iou, list(METRIC_LABELS).index(name) if name in METRIC_LABELS else len(METRIC_LABELS), name


def metric_label(column: str) -> str:
    """map_voc07_11pt@0.5 -> mAP@0.5 (VOC07 11-point)."""
    name, _, iou = column.partition("@")
    return f"mAP@{iou} ({METRIC_LABELS[name]})" if iou and name in METRIC_LABELS else column


def interval(summary) -> str:
    if not isinstance(summary, dict) or not isinstance(summary.get("ci95"), list):
        return "n/a"
    low, high = summary["ci95"]
    return f"{signed(summary.get('difference'))} [{signed(low)}, {signed(high)}]"


# ---- the timing table --------------------------------------------------------------------------------------
def timing_section(report: Reports) -> str:
    missing = not_cached(report, TIMING_STAGE, "rcnn timing-table")
    return missing or guarded(timing_table, report.rows[TIMING_STAGE]["metrics"]) + pictures(report, TIMING_STAGE)


def timing_table(metrics: dict) -> str:
    rows, speedups = field(metrics, "methods", list), metrics.get("speedups") or {}
    table = []
    for row in rows:
        if not isinstance(row, dict):
            raise Unreadable("the timing table's metrics hold a row that is not a record")
        speedup = speedups.get(row.get("method"), {})
        table.append([row.get("method"), duration(row.get("train_s")), number(row.get("test_s_per_image")),
                      number(row.get("test_s_per_image_with_proposals")), number(row.get("map")),
                      times(speedup.get("train")), times(speedup.get("test"))])
    return (f"<p>Measured on {esc(metrics.get('hardware', '?'))}; timing.md has the papers' figures beside these "
            f"and the protocol.</p>\n" + html_table(
                ["method", "training", "test s/image", "with proposals", "mAP (VOC07)", "training speedup",
                 "test speedup"], table))


# ---- the other tasks (FCN, localization): their metrics as tables, their pictures ------------------------------
def task_section(report: Reports, task: str, stage: str, names: Sequence[str]) -> str:
    missing = not_cached(report, stage, f"rcnn run --methods {task}")
    return missing or guarded(metrics_tables, report.rows[stage]["metrics"], names) + pictures(report, stage)


def metrics_tables(metrics: dict, first: Sequence[str]) -> str:
    """The scalar metrics (the headline ones first) in one table; each mapping of scalars (IoU per label) in a
    table of its own, each mapping of such mappings (a result per phase) as a matrix. Deeper values are left to
    the report's JSON file."""
    order = [*(name for name in first if name in metrics), *(name for name in metrics if name not in first)]
    scalars = [[name, number(metrics[name])] for name in order if is_scalar(metrics[name])]
    text = html_table(["metric", "value"], scalars) if scalars else ""
    for name in order:
        value = metrics[name]
        if isinstance(value, dict) and value and all(is_scalar(item) for item in value.values()):
            text += f"<h3>{esc(name)}</h3>\n" + html_table(["", name], [[key, number(v)] for key, v in value.items()])
        elif isinstance(value, dict) and value and all(isinstance(item, dict) for item in value.values()):
            columns = list(dict.fromkeys(key for item in value.values() for key, v in item.items() if is_scalar(v)))
            text += f"<h3>{esc(name)}</h3>\n" + html_table(
                ["", *columns],
                [[key, *(number(item.get(column)) for column in columns)] for key, item in value.items()])
    return text


# ---- explain pages -----------------------------------------------------------------------------------------
def explain_section(reports_root: Path) -> str:
    folder = reports_root / EXPLAIN
    pages = sorted(folder.glob(f"*/{PAGE}")) if folder.is_dir() else []
    if not pages:
        return "<p>None yet: <code>rcnn explain</code> writes a page of pictures for an image.</p>\n"
    items = []
    for page in pages:
        methods = []
        for record_path in sorted(page.parent.glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
                methods.append(f"{esc(record['title'])} (<code>{esc(record['method'])}</code>)")
                image = record.get("image")
            except (OSError, ValueError, KeyError, TypeError) as error:
                methods.append(f'<span class="problem">{esc(record_path.name)} unreadable: {esc(error)}</span>')
                image = None
        link = quote(page.relative_to(reports_root).as_posix())
        shown = f" <small>{esc(image)}</small>" if image else ""
        items.append(f'<li><a href="{link}">{esc(page.parent.name)}</a>{shown}: {", ".join(methods) or "no methods"}'
                     f"</li>")
    return "<ul>\n" + "\n".join(items) + "\n</ul>\n"


# ---- shared pieces -----------------------------------------------------------------------------------------
def not_cached(report: Reports, stage: str, command: str) -> str:
    """A line saying why the stage's results are not shown (missing, stale, partial, running or n/a), or ""."""
    row = report.rows.get(stage)
    if row is None:
        return f"<p>{esc(stage)}: not planned.</p>\n"
    if row["state"] == "n/a":
        return f"<p>{state_cell('n/a')} {esc(row['reason'])}</p>\n"
    if row["state"] == "cached":
        return ""
    return f"<p>{esc(stage)}: {state_cell(row['state'])}; <code>{esc(command)}</code> computes it.</p>\n"


def pictures(report: Reports, stage: str, folders: bool = True) -> str:
    """The images of the stage's current report: those at its top as plots, those of each subfolder as a gallery
    of thumbnails; links to its other files."""
    folder = report.root / stage
    if not folder.is_dir():
        return ""
    if not report.current(stage):
        return f'<p class="old">{esc(stage)}/ holds a report {esc(OLD_REPORT)}.</p>\n'
    files = report.files(stage)
    text = "".join(f'<figure><a href="{report.link(path)}"><img class="plot" src="{report.link(path)}" '
                   f'alt="{esc(path.name)}"></a><figcaption>{esc(stage)}/{esc(path.name)}</figcaption></figure>\n'
                   for path in files if is_image(path))
    others = [path for path in files if not is_image(path)]
    if others:
        text += ("<p>Files: " + " ".join(f'<a href="{report.link(path)}">{esc(path.name)}</a>' for path in others)
                 + "</p>\n")
    for subfolder in sorted(path for path in folder.iterdir() if path.is_dir()) if folders else []:
        images = sorted(path for path in subfolder.iterdir() if is_image(path))
        if images:
            more = len(images) - GALLERY_LIMIT
            text += (f"<h3>{esc(stage)}/{esc(subfolder.name)}/</h3>\n<div class=\"gallery\">"
                     + "".join(f'<a href="{report.link(path)}"><img src="{report.link(path)}" alt="{esc(path.name)}" '
                               f'title="{esc(path.name)}"></a>' for path in images[:GALLERY_LIMIT])
                     + "</div>\n" + (f"<p>and {more} more in the folder.</p>\n" if more > 0 else ""))
    return text


def guarded(render: Callable[..., str], *args) -> str:
    """What render(*args) writes, or a line saying what could not be read."""
    try:
        return render(*args)
    except Unreadable as problem:
        return f'<p class="problem">unreadable: {esc(problem)}</p>\n'
    except OSError as error:
        return f'<p class="problem">unreadable: {esc(error)}</p>\n'


def field(record, name: str, kind):
    """record[name], which must be of `kind`; Unreadable otherwise."""
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Unreadable(f"no {name!r} of the expected form in the stage's metrics")
    return value


def html_table(headers: list[str], rows: list[list], escaped: bool = False) -> str:
    """A table; cells are escaped unless `escaped` says they are HTML already."""
    def cell(value) -> str:
        return str(value) if escaped else esc(value)
    head = "".join(f"<th>{esc(header)}</th>" for header in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>\n"


def state_cell(state: str) -> str:
    return f'<span class="state {esc(state.replace("/", ""))}">{esc(state)}</span>'


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def number(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def signed(value) -> str:
    return f"{value:+.3f}" if isinstance(value, (int, float)) and not math.isnan(value) else "n/a"


def times(value) -> str:
    return f"{value:.1f}x" if isinstance(value, (int, float)) else "n/a"


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def esc(value) -> str:
    return html.escape(str(value))


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
         "nav{margin:.5em 0 1.5em}section{margin-bottom:2em}.about{color:#555}"
         "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;"
         "vertical-align:top}th{background:#f2f2f2}td:first-child{white-space:nowrap}td:not(:first-child){font-variant-numeric:tabular-nums}"
         ".state{font-weight:bold}.cached{color:#1a7f37}.missing,.stale{color:#9a6700}.partial,.running{color:#0969da}"
         ".na{color:#777}.problem{color:#cf222e}.old{color:#9a6700}"
         "img.plot{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}"
         ".gallery{display:flex;flex-wrap:wrap;gap:.5em}.gallery img{height:160px;border:1px solid #ddd}")
