"""Every relative Markdown link in README.md and docs/*.md points to a file of the repository, and, where it names
an anchor (``file.md#section``, ``#section``), to a heading of that Markdown file (GitHub's heading slugs)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")          # [text](target), not images
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(md: Path) -> list[str]:
    text = FENCE.sub("", md.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)      # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]   # not http:, mailto:


def test_slug_follows_github():
    assert slug("LoRA on MoE experts (CPU, 2026-12-04)") == "lora-on-moe-experts-cpu-2026-12-04"
    assert slug("Traffic / FLOP model (`benchmarks/traffic.py`)") == "traffic--flop-model-benchmarkstrafficpy"
    assert slug("What ran: `fastlora.trace()`") == "what-ran-fastloratrace"


def test_the_checker_sees_a_broken_link(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n[ok](#title) [bad](#nowhere) [file](b.md) `[not](a link)`\n```\n[x](y)\n```\n")
    assert links(md) == ["#title", "#nowhere", "b.md"]
    assert anchors(md) == {"title"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    bad = []
    for target in links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert bad == [], f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)
