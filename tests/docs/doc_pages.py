"""The pages of README.md and docs/, their code blocks, links and tables of contents, as the doc tests see them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A block the tests can only compile says why, in the line just before its opening fence.
NOT_RUN = re.compile(r"<!-- doc-test: not-run: (.+?) -->")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # why the tests cannot run it here (then they compile it, or check its commands exist)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced code block of a page (indented ones in lists included), in order."""
    lines = page.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = re.match(r"^( *)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        body = []
        i += 1
        while not re.match(r"^ *```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        marker = NOT_RUN.search(lines[start - 1]) if start else None
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(page: Path) -> list[tuple[int, str]]:
    """(level, text) of every heading outside code blocks."""
    out, fenced = [], False
    for line in page.read_text().split("\n"):
        if re.match(r"^ *```", line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6}) (.+)$", line)):
            out.append((len(m.group(1)), m.group(2)))
    return out


def toc_for(page: Path) -> str:
    """The table of contents a page carries at its top: its ## and ### headings, linked."""
    lines = []
    for level, text in headings(page):
        if level in (2, 3):
            lines.append("  " * (level - 2) + f"- [{text}](#{anchor(text)})")
    return "\n".join(lines)


def links(page: Path) -> list[str]:
    """Every markdown link target of a page, outside code blocks and inline code."""
    text, out = page.read_text(), []
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    out += re.findall(r"\]\(([^)\s]+)\)", text)
    out += re.findall(r"<(https?://[^>]+)>", text)
    return out
