"""The documentation holds together: relative links land on files and headings that exist, the
README stays a short door with the two set-up commands, and docs/configuration.md lists every
`config.pbtxt` parameter with its current default.

Anchors follow GitHub's rules, so a link that works here works when the files are read on GitHub.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from multilora.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "kernels" / "README.md",
        REPO / "docker" / "README.md"]
README_MAX_LINES = 200
# Parameters that issue 18 renames; the old name stays accepted, and the docs document the new one.
RENAMED = {"lora_kernels": "cuda_kernels"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?([^\s>]+)>?")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: `#` there is a shell comment, `](` is code."""
    lines, fenced = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and fenced is None:
            fenced = match.group(1)
        elif match and line.strip().startswith(fenced):
            fenced = None
        elif fenced is None:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text as rendered (no markup), lower case, without
    punctuation other than `-` and `_`, spaces turned into `-`."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)      # images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)     # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")   # repeats get -1, -2, ...
    return found


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text()):
        line_without_code = re.sub(r"`[^`]*`", "", line)
        targets += INLINE_LINK.findall(line_without_code) + REFERENCE_LINK.findall(line_without_code)
    return [t for t in targets if not SCHEME.match(t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        target = unquote(target)
        if not target:
            resolved = path
        elif target.startswith("/"):
            resolved = (REPO / target.lstrip("/")).resolve()
        else:
            resolved = (path.parent / target).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(f"{link}: no file {resolved}")
        elif anchor and (resolved.suffix != ".md" or unquote(anchor) not in anchors(resolved)):
            broken.append(f"{link}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_relative_links_point_at_files_and_headings_that_exist(path):
    assert broken_links(path) == []


def test_github_anchors():
    assert github_anchor("Triton: KServe v2 `generate` and `tritonclient`") == \
        "triton-kserve-v2-generate-and-tritonclient"
    assert github_anchor("`max_loras` and the adapter tiers") == "max_loras-and-the-adapter-tiers"
    assert github_anchor("Errors, disconnects, timeouts") == "errors-disconnects-timeouts"
    assert (github_anchor("Measurements (this project's machine: 2 cores)")
            == "measurements-this-projects-machine-2-cores")


def test_readme_is_a_door_with_the_two_set_up_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    commands = [line.split("#", 1)[0].strip() for line in readme.splitlines()]
    assert "make serve" in commands and "make test" in commands


def _shown(default: object) -> str:
    """A default as the configuration table writes it."""
    if default is dataclasses.MISSING:
        return "required"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default) if default != "" else "empty"


def test_configuration_doc_lists_every_parameter_with_its_default():
    text = (REPO / "docs" / "configuration.md").read_text()
    table = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = {name: default.split()[0] for name, default in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, re.M)}
    expected = {RENAMED.get(f.name, f.name): _shown(f.default) for f in dataclasses.fields(EngineConfig)}
    assert rows == expected
