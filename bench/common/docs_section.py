"""Replace one marked section of a Markdown file, leaving everything else as it was.

Benchmarks write their numbers into docs/benchmarks.md, which other tools and people also edit;
each tool owns only the text between its own markers:

    <!-- NAME:begin -->
    ...
    <!-- NAME:end -->

A missing file is created; a file without the markers gets the section appended.

    python -m bench.common.docs_section docs/benchmarks.md genai-perf < section.md
"""
from __future__ import annotations

import sys
from pathlib import Path

TITLE = "# Benchmarks\n\nEach section below is written by the script it names; edit text outside the markers only.\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between NAME's markers in `path` (created with a title when missing)."""
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    start, stop = text.find(begin), text.find(end)
    if start >= 0 and stop > start:
        text = text[:start] + block + text[stop + len(end):]
    elif start >= 0 or stop >= 0:
        raise ValueError(f"{path}: the markers of section '{name}' are broken (one missing or out of order)")
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.common.docs_section FILE.md SECTION_NAME < body.md")
    replace_section(Path(sys.argv[1]), sys.argv[2], sys.stdin.read())
