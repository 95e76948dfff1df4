"""Documents and pipeline steps: the vocabulary every part of llama_data speaks.

A `Document` is one unit of text with where it came from. A `Step` turns a stream of documents into
a stream of documents and accounts for every one it drops in a `StepStats` (DESIGN.md: "a dropped
document is counted under its reason"). `Filter` (keep or drop, with a reason) and `Mapper` (rewrite
a document) are the two common kinds of step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Document", "Filter", "Mapper", "Step", "StepStats"]


@dataclass(slots=True)
class Document:
    """One document: its text and provenance."""

    id: str
    """Stable identifier, unique within a run (e.g. the WARC record id, or file:line)."""
    text: str
    """The document's text (UTF-8 decoded)."""
    url: str | None = None
    """Where the document was crawled from, if known."""
    source: str = ""
    """The source or dataset name, used for mixing (e.g. "web", "code", "math")."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else a step records: crawl date, language and score, quality score, ..."""


@dataclass
class StepStats:
    """What one step did: documents kept, documents dropped per reason, and input errors.

    `errors` counts records that could not be read at all (malformed JSON, bad bytes, ...) by kind;
    `error_examples` keeps the first few locations ("file:line") of each kind for the report.
    """

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, list[str]] = field(default_factory=dict)

    MAX_EXAMPLES = 5

    def drop(self, reason: str) -> None:
        """Count one dropped document under `reason`."""
        self.dropped[reason] += 1

    def error(self, kind: str, where: str) -> None:
        """Count one unreadable record of `kind` at `where` (e.g. "data.jsonl:17")."""
        self.errors[kind] += 1
        examples = self.error_examples.setdefault(kind, [])
        if len(examples) < self.MAX_EXAMPLES:
            examples.append(where)

    def merge(self, other: StepStats) -> None:
        """Add another worker's counts to these."""
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.errors.update(other.errors)
        for kind, examples in other.error_examples.items():
            mine = self.error_examples.setdefault(kind, [])
            mine.extend(examples[: self.MAX_EXAMPLES - len(mine)])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "errors": dict(self.errors),
            "error_examples": self.error_examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepStats:
        """The statistics `to_dict` wrote (missing keys count as zero)."""
        stats = cls(kept=data.get("kept", 0))
        stats.dropped.update(data.get("dropped", {}))
        stats.errors.update(data.get("errors", {}))
        stats.error_examples = {k: list(v) for k, v in data.get("error_examples", {}).items()}
        return stats


class Step(ABC):
    """A stage of a pipeline: a stream of documents in, a stream out, drops counted."""

    name: str = "step"

    @abstractmethod
    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        """Yield the documents that survive this step, counting each one kept or dropped."""


class Filter(Step):
    """A step that keeps or drops each document on its own; `reason` says why it drops one."""

    @abstractmethod
    def reason(self, doc: Document) -> str | None:
        """None to keep `doc`, else a short reason to drop it (e.g. "url_blocklist")."""

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            why = self.reason(doc)
            if why is None:
                stats.kept += 1
                yield doc
            else:
                stats.drop(why)


class Mapper(Step):
    """A step that rewrites each document (e.g. PII scrubbing); it drops none."""

    @abstractmethod
    def map(self, doc: Document) -> Document:
        """The rewritten document."""

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            stats.kept += 1
            yield self.map(doc)
