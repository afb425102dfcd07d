"""Open a static page in headless Chromium (Debian's `chromium`; .ci/install-browser installs it) and list what
is broken: an image that did not load, a link to a file that is not there or to an id the target lacks, anything
that would reach the network. Used on the run's report page and on the explain pages: `check_page(path)`.

How: a checker page in a temporary folder loads the page from its file URL in an iframe (Chromium's
--allow-file-access-from-files lets it read the frame), waits for the frame's load event (every image loaded or
failed), and writes what it found (each image's naturalWidth, each link as the browser resolved it, the page's
ids) as JSON into itself; `--dump-dom` prints it. The files and ids the links name are checked here.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pytest

BROWSER = shutil.which("chromium")
NO_BROWSER = "no chromium here (.ci/install-browser installs Debian's)"
needs_browser = pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER)

CHECKER = """<!doctype html><html><head><meta charset="utf-8"></head><body><pre id="out">pending</pre>
<iframe id="page" src="PAGE_URL" width="1200" height="800"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {
  let found;
  try {
    const page = document.getElementById("page").contentDocument;
    found = {
      url: page.URL,
      title: page.title,
      images: [...page.images].map(image => ({src: image.src, complete: image.complete, width: image.naturalWidth})),
      links: [...page.querySelectorAll("[href]")].map(element => ({tag: element.tagName, url: element.href})),
      sources: [...page.querySelectorAll("[src]")].map(element => ({tag: element.tagName, url: element.src})),
      ids: [...page.querySelectorAll("[id]")].map(element => element.id),
    };
  } catch (error) {
    found = {error: String(error)};
  }
  document.getElementById("out").textContent = JSON.stringify(found);
});
</script></body></html>
"""


def check_page(page: Path, timeout: float = 120) -> list[str]:
    """What is broken on the page (empty when nothing): images that did not load (naturalWidth 0), links whose
    file does not exist or whose #id the target lacks, URLs that are not file URLs (the network). Skips the
    calling test where there is no chromium."""
    if BROWSER is None:
        pytest.skip(NO_BROWSER)
    page = Path(page).resolve()
    if not page.is_file():
        return [f"{page}: no such page"]
    found = open_in_browser(page, timeout)
    if "error" in found:
        return [f"{page}: the checker could not read the page: {found['error']}"]
    if found["url"] != page.as_uri():
        return [f"{page}: the browser showed {found['url']} instead"]
    problems = [f"image not loaded: {image['src']}" for image in found["images"] if not image["width"]]
    for link in found["links"] + found["sources"]:
        problem = link_problem(link["url"], page, set(found["ids"]))
        if problem:
            problems.append(f"<{link['tag'].lower()}> {link['url']}: {problem}")
    return problems


def open_in_browser(page: Path, timeout: float) -> dict:
    """What the checker page found in `page`, loaded from its file URL in headless Chromium."""
    with tempfile.TemporaryDirectory(prefix="check-page-") as work:
        checker = Path(work) / "check.html"
        checker.write_text(CHECKER.replace("PAGE_URL", html.escape(page.as_uri())))
        result = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={work}/profile", "--allow-file-access-from-files", "--virtual-time-budget=20000",
             "--dump-dom", checker.as_uri()],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    match = re.search(r'<pre id="out">(.*?)</pre>', result.stdout, re.DOTALL)
    if not match or match.group(1) == "pending":
        tail = result.stderr.strip().splitlines()[-3:]
        return {"error": f"no result from chromium (exit {result.returncode}): {' | '.join(tail)}"}
    return json.loads(html.unescape(match.group(1)))


def link_problem(url: str, page: Path, page_ids: set[str]) -> str | None:
    """Why a link the browser resolved does not resolve to a file (and an id in it), or None."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return "not a file URL: opening it would need the network" if parts.scheme not in ("data", "about") else None
    target = Path(url2pathname(unquote(parts.path)))
    if not target.is_file():
        return "the folder is not a file" if target.is_dir() else "no such file"
    if not parts.fragment:
        return None
    ids = page_ids if target == page else ids_of(target)
    return None if unquote(parts.fragment) in ids else f"no id {parts.fragment!r} in {target.name}"


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for name, value in attrs if name == "id" and value)


def ids_of(path: Path) -> set[str]:
    """The ids in an HTML file (of another page a link points into)."""
    if path.suffix.lower() not in (".html", ".htm"):
        return set()
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return parser.ids
