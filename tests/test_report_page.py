"""reports/<config>/index.html (pipeline.report_page): built from status rows, manifests and published reports,
on a fake reports folder; opened in headless Chromium (tests/browser.py) for a fake run and for a real one."""
import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
from browser import check_page, needs_browser
from tiny import method_options, options

from pipeline.cli import build_parser, main, make_context, write_report_page
from pipeline.explain.page import Picture, write_pictures
from pipeline.methods import METHODS
from pipeline.report_page import write_page

HEADLINES = {"rcnn-evaluate": ("map_voc07_11pt", "map_all_point"), "fcn-evaluate": ("mean_iou",)}
ABOUT = {"config": "demo", "data": "data/shapes", "cache": "cache"}
EVALUATION = {
    "iou": 0.5, "map_voc07_11pt": 0.625, "map_all_point": 0.59375,
    "ap_voc07_11pt": {"circle": 0.75, "square": 0.5, "star": None},
    "variants": {"svm": {"map_voc07_11pt@0.5": 0.5, "map_all_point@0.5": 0.4875},
                 "svm_bbox": {"map_voc07_11pt@0.5": 0.625, "map_all_point@0.5": 0.59375}},
    "differences": {"svm": {"0.5": {"metric": "all_point", "resamples": 100, "difference": 0.125,
                                    "ci95": [0.0625, 0.1875]}}},
    "coco": {"svm_bbox": {"ap": 0.3125, "ap50": 0.5625, "ap75": 0.25, "ap_small": None, "ap_medium": 0.1875,
                          "ap_large": 0.4375}}, "warnings": ["the SVM of star ranks ..."]}
FCN = {"pixel_accuracy": 0.875, "mean_iou": 0.4375, "iou": {"background": 0.9375, "circle": 0.25},
       "upsampling": "bilinear"}


def png() -> bytes:
    return cv2.imencode(".png", np.full((6, 8, 3), 200, np.uint8))[1].tobytes()


class FakeRun:
    """A reports folder and a cache with the manifests and reports of the stages `cached` puts there."""

    def __init__(self, root: Path):
        self.cache, self.reports, self.rows = root / "cache", root / "reports" / "demo", []

    def cached(self, stage: str, metrics: dict, files: dict[str, bytes], key: str = "0123456789abcdef") -> dict:
        output = self.cache / stage / key
        for name, data in files.items():
            for folder in (output / "report", self.reports / stage):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
        (output / "report").mkdir(parents=True, exist_ok=True)
        (output / "manifest.json").write_text(json.dumps({
            "stage": stage, "key": key, "description": {}, "shards": {}, "metrics": metrics,
            "timings": {"wall_s": 75.0, "compute_s": 75.0, "shard_s": 70.0, "reduce_s": 5.0},
            "finished": "2026-12-01T10:00:00+00:00"}))
        return self.row(stage, "cached", key, metrics)

    def row(self, stage: str, state: str, key: str = "fedcba9876543210", metrics: dict | None = None) -> dict:
        row = {"stage": stage, "state": state, "key": key, "size_bytes": 10, "shards_done": 0, "shards": 2,
               "stale_keys": [], "running_pid": None, "metrics": metrics or {}, "problems": []}
        self.rows.append(row)
        return row

    def page(self) -> str:
        return write_page(self.reports, self.cache, self.rows, HEADLINES, ABOUT).read_text()


def section(page: str, anchor: str) -> str:
    found = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.DOTALL)
    assert found, f"no section {anchor}"
    return found.group(1)


@pytest.fixture
def run(tmp_path):
    """R-CNN evaluated (with PR curves and two detection pictures), the FCN evaluated, everything else missing."""
    fake = FakeRun(tmp_path)
    fake.cached("rcnn-evaluate", EVALUATION, {"map.md": b"# mAP", "pr_curves.png": png(),
                                              "detections/000001.jpg": png(), "detections/000002.jpg": png()})
    fake.cached("fcn-evaluate", FCN, {"segmentation.md": b"# FCN", "confusion.png": png(),
                                      "pictures/000003.png": png()})
    fake.row("fast-rcnn-evaluate", "missing")
    fake.row("timing-table", "stale")
    return fake


def test_a_cached_evaluation_shows_its_map_tables_pr_curves_and_pictures(run):
    rcnn = section(run.page(), "rcnn")
    assert "R-CNN: SVM + bbox regression" in rcnn and "0.625" in rcnn and "0.594" in rcnn  # variant titles, mAPs
    assert rcnn.index("R-CNN: SVM + bbox regression") < rcnn.index("SVM, no bbox regression")  # the record's order
    assert "+0.125 [+0.062, +0.188]" in rcnn  # the bootstrap interval
    assert "<td>circle</td><td>0.750</td>" in rcnn and "<td>star</td><td>n/a</td>" in rcnn
    assert "0.312" in rcnn and "the SVM of star ranks" in rcnn  # COCO AP, the warnings
    assert "AP small (area &lt; 32² px)" in rcnn and "0.438" in rcnn  # by size, titled
    assert 'src="rcnn-evaluate/pr_curves.png"' in rcnn and 'src="rcnn-evaluate/detections/000002.jpg"' in rcnn
    assert 'href="rcnn-evaluate/map.md"' in rcnn


def test_the_stages_table_has_state_key_time_and_headline_metrics(run):
    stages = section(run.page(), "stages")
    row = re.search(r"<tr><td>rcnn-evaluate</td>(.*?)</tr>", stages).group(1)
    assert "cached" in row and "0123456789abcdef" in row and "1 min 15 s" in row
    assert "map_voc07_11pt=0.625 map_all_point=0.594" in row and 'href="rcnn-evaluate/map.md"' in row


def test_a_stage_not_cached_shows_its_state_and_the_command_that_computes_it(run):
    run.rows.append({"stage": "localize", "state": "n/a", "reason": "localize needs single-object data"})
    page = run.page()
    assert "missing" in section(page, "fast-rcnn") and "rcnn run --methods fast-rcnn" in section(page, "fast-rcnn")
    assert "stale" in section(page, "timing") and "rcnn timing-table" in section(page, "timing")
    assert "localize needs single-object data" in section(page, "localize")
    assert "not planned" in section(page, "faster-rcnn")  # no status row at all
    for method in METHODS:
        section(page, method)  # every method has its section


def test_the_fcn_results_come_from_its_manifest_and_report(run):
    fcn = section(run.page(), "fcn")
    assert "<td>mean_iou</td><td>0.438</td>" in fcn and "<td>background</td><td>0.938</td>" in fcn
    assert 'src="fcn-evaluate/confusion.png"' in fcn and 'src="fcn-evaluate/pictures/000003.png"' in fcn


def test_every_explain_page_is_linked_with_the_methods_it_explains(run):
    picture = Picture("proposals", "Proposals", "step 2", "boxes", np.zeros((4, 4, 3), np.uint8))
    for stem in ("000007", "a b"):
        write_pictures(run.reports / "explain" / stem, "rcnn", "R-CNN", {"image": f"{stem}.jpg"}, [picture])
    write_pictures(run.reports / "explain" / "000007", "fast-rcnn", "Fast R-CNN", {"image": "000007.jpg"}, [picture])
    (run.reports / "explain" / "a b" / "broken.json").write_text("{")
    explain = section(run.page(), "explain")
    assert 'href="explain/000007/index.html"' in explain and 'href="explain/a%20b/index.html"' in explain
    assert "Fast R-CNN" in explain and "broken.json unreadable" in explain


def test_no_explain_page_yet_says_so(run):
    assert "None yet" in section(run.page(), "explain")


def test_unreadable_records_are_named_in_their_place_and_the_page_is_still_written(run):
    (run.cache / "rcnn-evaluate" / "0123456789abcdef" / "manifest.json").write_text("{ not json")
    run.cached("sppnet-evaluate", {"iou": 0.5}, {})  # metrics of another shape: no variants
    page = run.page()
    assert "unreadable" in re.search(r"<tr><td>rcnn-evaluate</td>(.*?)</tr>", section(page, "stages")).group(1)
    assert "unreadable: no &#x27;variants&#x27;" in section(page, "sppnet")
    assert "0.625" in section(page, "rcnn")


def test_a_report_published_by_another_run_is_marked_and_not_shown_as_this_ones(run):
    (run.reports / "rcnn-evaluate" / "pr_curves.png").write_bytes(png() + b"another run's")
    rcnn = section(run.page(), "rcnn")
    assert "0.625" in rcnn  # the metrics are the manifest's, always this output's
    assert "pr_curves.png" not in rcnn and "other settings or data" in rcnn
    assert "(other run)" in section(run.page(), "stages")


def test_the_page_is_written_atomically(run):
    run.page()
    assert [path.name for path in run.reports.iterdir() if path.is_file()] == ["index.html"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.urls += [attributes[name] for name in ("href", "src") if name in attributes]
        self.ids.update([attributes["id"]] if "id" in attributes else [])


def test_every_link_and_picture_is_a_relative_path_to_a_file_or_an_id_of_the_page(run):
    page = run.reports / "index.html"
    run.page()
    links = Links()
    links.feed(page.read_text())
    assert links.urls
    for url in links.urls:
        if url.startswith("#"):
            assert url[1:] in links.ids
        else:
            assert "://" not in url and not url.startswith("/") and (run.reports / unquote(url)).is_file(), url


@needs_browser
def test_the_page_opens_in_a_browser_with_every_picture_and_link(run):
    write_pictures(run.reports / "explain" / "000007", "rcnn", "R-CNN", {"image": "000007.jpg"},
                   [Picture("proposals", "Proposals", "step 2", "boxes", np.zeros((4, 4, 3), np.uint8))])
    run.page()
    assert check_page(run.reports / "index.html") == []
    assert check_page(run.reports / "explain" / "000007" / "index.html") == []


@needs_browser
def test_the_browser_check_finds_broken_pictures_links_and_anchors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    (tmp_path / "other.html").write_text('<p id="there">')
    (tmp_path / "page.html").write_text(
        '<h1 id="top">t</h1><img src="bad.png"><img src="gone.png"><a href="#top">ok</a><a href="#nowhere">x</a>'
        '<a href="other.html#there">ok</a><a href="other.html#elsewhere">x</a><a href="missing.md">x</a>'
        '<a href="https://example.org/">x</a>')
    problems = "\n".join(check_page(tmp_path / "page.html"))
    assert problems.count("image not loaded") == 2 and "gone.png: no such file" in problems
    assert "no id 'nowhere'" in problems and "no id 'elsewhere' in other.html" in problems
    assert "missing.md: no such file" in problems and "example.org/: not a file URL" in problems
    assert len(problems.splitlines()) == 7


def test_a_page_that_cannot_be_written_is_a_warning_not_a_failed_command(shapes_root, tmp_path, caplog):
    (tmp_path / "reports").write_text("a file where the reports folder should be")
    args = build_parser().parse_args(["status", *options(shapes_root, tmp_path / "cache", tmp_path / "reports")])
    with caplog.at_level(logging.WARNING):
        assert write_report_page(make_context(args)) is None
    assert "the report page was not written" in caplog.text


def test_a_single_stage_command_rebuilds_the_page(shapes_root, tmp_path):
    assert main(["proposals", *options(shapes_root, tmp_path / "cache", tmp_path / "reports")]) == 0
    page = (tmp_path / "reports" / "demo" / "index.html").read_text()
    assert re.search(r"<tr><td>proposals</td><td><span class=\"state cached\">", page)
    assert 'href="proposals/recall.md"' in page and "rcnn-evaluate: <span class=\"state missing\">" in page


@pytest.mark.slow
@needs_browser
def test_the_report_page_of_a_timing_run_opens_in_a_browser(timing_run, tmp_path):
    """`rcnn timing-table` wrote the page; with an explain page beside it, the rebuilt page and the explain page
    open from their file URLs with every picture loaded and every link resolved."""
    data, cache, reports = timing_run
    assert (reports / "demo" / "index.html").is_file()
    shutil.copytree(reports, tmp_path / "reports")
    write_pictures(tmp_path / "reports" / "demo" / "explain" / "000001", "rcnn", "R-CNN", {"image": "000001.jpg"},
                   [Picture("proposals", "Proposals", "step 2", "boxes", np.zeros((8, 8, 3), np.uint8))])
    args = build_parser().parse_args(["status", *method_options(data, cache, tmp_path / "reports")])
    page = write_report_page(make_context(args))
    text = page.read_text()
    for method in METHODS.values():
        assert f'src="{method.evaluate_stage}/pr_curves.png"' in section(text, method.name), method.name
    assert 'src="timing-table/timing.png"' in section(text, "timing") and "explain/000001/index.html" in text
    assert check_page(page) == []
    assert check_page(page.parent / "explain" / "000001" / "index.html") == []
