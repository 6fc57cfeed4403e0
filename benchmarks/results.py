"""Keeps benchmarks/results.md as one section per benchmark, each rewritten by its own script."""

from __future__ import annotations

import re
import shlex
import statistics
import sys
from pathlib import Path

HEADER = (
    "# cachefs benchmark results\n\nEach section is rewritten by the script named in its title.\n"
)


def replace_section(path: Path, title: str, body: str) -> None:
    """Replaces (or appends) the `## title` section of a Markdown file."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def rerun_command(script: str) -> str:
    """The command line that ran `script` (`benchmarks/NAME.py`), without its --results."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--results=")]
    if "--results" in argv:
        del argv[argv.index("--results") : argv.index("--results") + 2]
    return shlex.join(["python", script, *argv])


def median_range(values: list[float], fmt: str) -> str:
    """"median [min–max]" of repeated passes, each formatted with the spec `fmt` (e.g. ".2f");
    just the value when there was one pass."""
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values), fmt)}–{format(max(values), fmt)}]"
