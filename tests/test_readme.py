"""Every command the README and docs/ show in a code block still parses, so the pages cannot drift from
the CLI: `rcnn ...` lines through the CLI's own parser (subcommand and flags) and, where they name a
config, through the config loader (the preset exists, every --set key is one it has, every value fits
the schema); `make` targets against the Makefile; `python` scripts against the files."""
import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.engine.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# programs a page may show that are not this project's (fetching data, a cluster's processes, a shell)
OTHER_PROGRAMS = {"git", "dask", "cat", "pip", "source"}
CODE_BLOCK = re.compile(r"^```(?:sh|bash)\n(.*?)^```", re.M | re.S)  # shell blocks only


def shown_commands(page: Path) -> list[str]:
    """The commands of a page's code blocks: continuation lines joined, comments and output lines left
    out, `a && b` split in two."""
    commands = []
    for block in CODE_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                command, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) if "&&" in words \
                    else (words, [])
                commands.append(shlex.join(command))
    return [command for command in commands if command]


def every_shown_command():
    for page in PAGES:
        for command in shown_commands(page):
            yield pytest.param(command, id=f"{page.name}: {command[:60]}")


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("command", list(every_shown_command()))
def test_a_shown_command_parses(command):
    words = shlex.split(command)
    while "=" in words[0] and len(words) > 1:  # VAR=value before the program
        words = words[1:]
    program, *arguments = words
    if program == "rcnn":
        try:
            args = build_parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"the CLI rejects {command!r}")
        if hasattr(args, "config") and hasattr(args, "set"):
            load_config(args.config, args.set or [])  # raises ConfigError naming the key or preset
    elif program == "make":
        assert set(arguments) <= makefile_targets(), f"{command!r}: no such Makefile target"
    elif program == "python":
        assert (ROOT / arguments[0]).is_file(), f"{command!r}: no such script"
    elif program == "jupyter":
        assert (ROOT / arguments[-1]).is_file(), f"{command!r}: no such notebook"
    else:
        assert program in OTHER_PROGRAMS, f"{command!r}: a program the pages are not expected to show"


def test_the_readme_is_a_short_page_that_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "make demo" in shown_commands(ROOT / "README.md") and "make test" in shown_commands(ROOT / "README.md")


def test_every_page_the_readme_links_exists():
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links and all((ROOT / link).is_file() for link in links)
