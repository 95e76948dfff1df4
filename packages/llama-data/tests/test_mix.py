"""Source mixing by weight: shares at every prefix, token weighting, exhaustion, validation."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest

from llama_data.document import Document
from llama_data.mix import LLAMA3_PRETRAINING_MIX, mix, normalize_weights


def endless(name: str, words: int = 1) -> Iterator[Document]:
    for i in itertools.count():
        yield Document(id=f"{name}-{i}", text=" ".join(["w"] * words))


def test_document_shares_follow_the_paper_mix_at_every_prefix() -> None:
    """With endless sources, every prefix of the output is within one document of the targets."""
    sources = {name: endless(name) for name in LLAMA3_PRETRAINING_MIX}
    counts: Counter[str] = Counter()
    for n, doc in enumerate(mix(sources, LLAMA3_PRETRAINING_MIX, max_documents=2000), start=1):
        counts[doc.source] += 1
        for name, weight in LLAMA3_PRETRAINING_MIX.items():
            assert abs(counts[name] - weight * n) <= 1.0 + 1e-9, (n, name, counts)
    assert sum(counts.values()) == 2000


def test_token_shares_use_the_length_function() -> None:
    """Weighted by tokens, a source of long documents contributes fewer documents."""
    sources = {"long": endless("long", words=10), "short": endless("short", words=1)}
    out = list(
        mix(
            sources,
            {"long": 0.5, "short": 0.5},
            length=lambda d: len(d.text.split()),
            max_documents=1100,
        )
    )
    tokens: Counter[str] = Counter()
    for doc in out:
        tokens[doc.source] += len(doc.text.split())
    assert abs(tokens["long"] - tokens["short"]) <= 10
    assert Counter(d.source for d in out)["short"] == pytest.approx(1000, abs=2)


def test_exhausted_source_is_dropped_or_stops_the_mix() -> None:
    """A finite source that runs dry leaves the rest to fill the output, or ends the mix."""
    finite = [Document(id=f"f{i}", text="x") for i in range(3)]
    out = list(
        mix(
            {"finite": finite, "other": endless("o")},
            {"finite": 0.5, "other": 0.5},
            max_documents=20,
        )
    )
    assert [d.id for d in out if d.source == "finite"] == ["f0", "f1", "f2"]
    assert len(out) == 20
    stopped = list(
        mix(
            {"finite": list(finite), "other": endless("o")},
            {"finite": 0.5, "other": 0.5},
            stop_when_any_exhausted=True,
        )
    )
    assert Counter(d.source for d in stopped) == {"finite": 3, "other": 3}


def test_mix_is_deterministic_and_keeps_given_sources() -> None:
    """The same inputs give the same order; a document that already names its source keeps it."""

    def run() -> list[str]:
        tagged = (Document(id=f"t{i}", text="x", source="curated") for i in range(50))
        return [
            f"{d.source}:{d.id}"
            for d in mix({"a": tagged, "b": endless("b")}, {"a": 1, "b": 3}, max_documents=40)
        ]

    first = run()
    assert first == run()
    assert sum(1 for s in first if s.startswith("curated:")) == 10


def test_bad_weights_are_explained() -> None:
    """Negative, NaN, all-zero and unknown-source weights are errors naming the problem."""
    with pytest.raises(ValueError, match="'a' must be a finite number >= 0"):
        normalize_weights({"a": -1.0})
    with pytest.raises(ValueError, match="'a' must be a finite number"):
        normalize_weights({"a": float("nan")})
    with pytest.raises(ValueError, match="must not all be zero"):
        normalize_weights({"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match=r"not given: \['c'\]"):
        list(mix({"a": []}, {"a": 1.0, "c": 1.0}))
