"""Documents, step statistics, and the Filter / Mapper step kinds."""

from __future__ import annotations

from llama_data.document import Document, Filter, Mapper, StepStats


class DropShort(Filter):
    name = "drop_short"

    def reason(self, doc: Document) -> str | None:
        return "too_short" if len(doc.text) < 5 else None


class Upper(Mapper):
    name = "upper"

    def map(self, doc: Document) -> Document:
        return Document(doc.id, doc.text.upper(), doc.url, doc.source, dict(doc.metadata))


def docs(*texts: str) -> list[Document]:
    return [Document(id=str(i), text=t) for i, t in enumerate(texts)]


def test_filter_keeps_and_counts_drops_by_reason() -> None:
    """A Filter yields the documents it keeps and counts each drop under its reason."""
    stats = StepStats()
    kept = list(DropShort().run(docs("hello world", "hi", "", "long enough"), stats))
    assert [d.id for d in kept] == ["0", "3"]
    assert stats.kept == 2 and stats.dropped == {"too_short": 2}


def test_mapper_rewrites_every_document() -> None:
    """A Mapper rewrites each document and drops none."""
    stats = StepStats()
    out = list(Upper().run(docs("ab", "cd"), stats))
    assert [d.text for d in out] == ["AB", "CD"] and stats.kept == 2 and not stats.dropped


def test_errors_keep_a_few_examples_and_merge() -> None:
    """Errors are counted in full, with at most MAX_EXAMPLES locations kept; merging adds up."""
    a, b = StepStats(), StepStats()
    for line in range(8):
        a.error("invalid_json", f"a.jsonl:{line}")
    b.error("invalid_json", "b.jsonl:1")
    b.drop("too_short")
    b.kept = 3
    a.merge(b)
    assert a.errors == {"invalid_json": 9}
    assert a.error_examples["invalid_json"] == [f"a.jsonl:{i}" for i in range(5)]
    assert a.to_dict() == {
        "kept": 3,
        "dropped": {"too_short": 1},
        "errors": {"invalid_json": 9},
        "error_examples": {"invalid_json": [f"a.jsonl:{i}" for i in range(5)]},
    }
