"""The pictures `rcnn explain` writes for one image and the static page that shows them.

Each method explained writes `<method>.json` (its pictures, in order, with their titles, the lecture's
step and a caption) and one PNG per picture into reports/<config>/explain/<stem>/; the folder's
index.html is rebuilt from every `<method>.json` there, so explaining a second method adds to the page.
The page is plain HTML with relative links: it opens from a file URL, with no network and no script.
"""
from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.engine.cache import commit_file, temporary_path, write_json_atomic


@dataclass(frozen=True)
class Picture:
    name: str          # the file's stem, unique within a method: "proposals", "warped-regions", ...
    title: str
    slide: str         # the lecture's step it shows, as the slides name it
    caption: str       # what is drawn, in words (colours, numbers)
    image: np.ndarray  # RGB uint8[H, W, 3]


DISPLAY_WIDTH = 400


@dataclass
class Scene:
    """What an explainer draws from: the image, the arrays its `compute` cached for it, the method's classes,
    the image's ground truth (boxes[G, 4], class indices[G]) when it is a data-set image, the trained outputs
    (role -> StageCache), the data set (training images, for the hard negatives) and the detector's params."""
    rgb: np.ndarray
    arrays: dict
    classes: list[str]
    ground_truth: tuple[np.ndarray, np.ndarray] | None
    trained: Mapping
    dataset: object
    params: Mapping


@dataclass(frozen=True)
class Explainer:
    """What a method can draw. compute(models, rgb, proposals or None, params, device) -> named arrays and
    scalars, cached per image by the explain stage (the steps in between that its detector does not keep);
    draw(scene) -> its pictures, in the lecture's order."""
    title: str
    compute: Callable[[object, np.ndarray, np.ndarray | None, Mapping, str], dict]
    draw: Callable[[Scene], list[Picture]]


def write_pictures(folder: Path, method: str, title: str, about: dict, pictures: list[Picture]) -> Path:
    """Write `<method>-<name>.png` for each picture and `<method>.json`, then rebuild the folder's index.html
    (returned). `about` (image, config, keys) goes into the JSON file."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for picture in pictures:
        file_name = f"{method}-{picture.name}.png"
        write_png(folder / file_name, picture.image)
        entries.append({"file": file_name, "title": picture.title, "slide": picture.slide,
                        "caption": picture.caption})
    write_json_atomic(folder / f"{method}.json", {"method": method, "title": title, **about, "pictures": entries})
    return write_page(folder)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """The picture as PNG; one narrower than DISPLAY_WIDTH (a small image's) enlarged by a whole factor first."""
    factor = -(-DISPLAY_WIDTH // rgb.shape[1])
    if factor > 1:
        rgb = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    temporary = temporary_path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: OpenCV could not encode the picture")
    temporary.write_bytes(encoded.tobytes())
    commit_file(temporary, path)


def explained_methods(folder: Path) -> list[dict]:
    """The `<method>.json` records of a folder, in the order of their methods' names."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def write_page(folder: Path) -> Path:
    """index.html of an image's folder: every method's pictures, each with its title, step and caption."""
    records = explained_methods(folder)
    image = html.escape(records[0]["image"]) if records else folder.name
    sections = []
    for record in records:
        figures = "\n".join(
            f'<figure><figcaption><b>{html.escape(entry["title"])}</b> <i>({html.escape(entry["slide"])})</i><br>'
            f'{html.escape(entry["caption"])}</figcaption>'
            f'<img src="{html.escape(entry["file"])}" alt="{html.escape(entry["title"])}"></figure>'
            for entry in record["pictures"])
        sections.append(f'<section id="{html.escape(record["method"])}"><h2>{html.escape(record["title"])}</h2>\n'
                        f"{figures}</section>")
    contents = " · ".join(f'<a href="#{html.escape(r["method"])}">{html.escape(r["title"])}</a>' for r in records)
    page = folder / "index.html"
    temporary = temporary_path(page)
    temporary.write_text(
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>explain {html.escape(folder.name)}</title>\n"
        f"<style>{STYLE}</style></head>\n<body><p><a href=\"../../index.html\">run report</a></p>\n"
        f"<h1>{html.escape(folder.name)}</h1><p>{image}</p><p>{contents}</p>\n" + "\n".join(sections)
        + "\n</body></html>\n")
    commit_file(temporary, page)
    return page


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
         "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ccc}figcaption{margin-bottom:.4em}")
