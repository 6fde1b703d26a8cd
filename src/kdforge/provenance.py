"""Where a loss, a method or a task comes from: its paper, as data.

Registered components carry a :class:`Paper`; the README's methods table, ``kdforge list
--methods`` and the model cards' citations are generated from them, so they never drift
from the code. A leaf module: it imports nothing of kdforge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Paper:
    """A paper a component implements: ``Paper("Distilling the Knowledge in a Neural Network", 2015, "1503.02531")``."""

    title: str
    year: int
    arxiv: str | None = None
    #: where the paper is when it is not on arXiv (a proceedings page)
    url: str | None = None
    authors: str | None = None

    @property
    def link(self) -> str | None:
        if self.arxiv:
            return f"https://arxiv.org/abs/{self.arxiv}"
        return self.url

    def markdown(self) -> str:
        """``[Title](link) (year)``, or the title alone when there is no link."""
        title = f"[{self.title}]({self.link})" if self.link else self.title
        return f"{title} ({self.year})"

    def key(self) -> str:
        """A BibTeX key: the first word of the title that is not an article, and the year."""
        words = [w for w in re.findall(r"[A-Za-z0-9]+", self.title) if w.lower() not in {"a", "an", "the", "on"}]
        return f"{(words[0] if words else 'paper').lower()}{self.year}"

    def identity(self) -> str:
        """What makes two records the same paper: its arXiv id, else its link, else its title."""
        return self.arxiv or self.url or " ".join(self.title.lower().split())

    def bibtex(self, key: str | None = None) -> str:
        """A ``@misc`` entry under ``key`` (default :meth:`key`)."""
        fields = [f"  title = {{{self.title}}}", f"  year = {{{self.year}}}"]
        if self.authors:
            fields.append(f"  author = {{{self.authors}}}")
        if self.arxiv:
            fields += [f"  eprint = {{{self.arxiv}}}", "  archivePrefix = {arXiv}"]
        elif self.url:
            fields.append(f"  url = {{{self.url}}}")
        return f"@misc{{{key or self.key()},\n" + ",\n".join(fields) + "\n}"


def unique_papers(papers: Iterable[Paper | None]) -> list[Paper]:
    """``papers`` in order, each once (see :meth:`Paper.identity`), without the Nones."""
    seen: set[str] = set()
    kept = []
    for paper in papers:
        if paper is not None and paper.identity() not in seen:
            seen.add(paper.identity())
            kept.append(paper)
    return kept


def bibtex_entries(papers: Iterable[Paper]) -> str:
    """BibTeX entries of ``papers``, one blank line apart; a key two papers share gets b, c, ... on the later ones."""
    entries, used = [], set()
    for paper in papers:
        key, suffix = paper.key(), "b"
        while key in used:
            key, suffix = paper.key() + suffix, chr(ord(suffix) + 1)
        used.add(key)
        entries.append(paper.bibtex(key))
    return "\n\n".join(entries)
