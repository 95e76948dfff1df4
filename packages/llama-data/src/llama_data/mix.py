"""Data mixing: interleave several document sources so that each contributes a set share (§3.1.2).

The Llama 3 pretraining mix is "roughly 50% of tokens corresponding to general knowledge, 25% of
mathematical and reasoning tokens, 17% code tokens, and 8% multilingual tokens" (§3.1.2). For
annealing, the final 40M tokens upsample high-quality sources (§3.1.3, §3.4.3); `ANNEALING_MIX`
is a starting point to be tuned, not a number from the paper.

`mix` is a deterministic weighted interleave: at each step it emits from the source that is furthest
behind its target share (of tokens, estimated by a user-given length function, or of documents),
so the running mixture tracks the weights closely at every prefix instead of only on average, and
the same inputs and weights always give the same order. A source that runs dry is dropped and the
remaining weights are renormalised; `stop_when_any_exhausted=True` ends the mix instead, which keeps
the ratios exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from llama_data.document import Document

__all__ = ["ANNEALING_MIX", "LLAMA3_PRETRAINING_MIX", "mix", "normalize_weights"]

LLAMA3_PRETRAINING_MIX: Mapping[str, float] = {
    "general": 0.50,  # general knowledge (§3.1.2)
    "math_reasoning": 0.25,  # mathematical and reasoning data (§3.1.2)
    "code": 0.17,  # code (§3.1.2)
    "multilingual": 0.08,  # multilingual (§3.1.2)
}
"""The paper's final pretraining mixture, by tokens (§3.1.2)."""

ANNEALING_MIX: Mapping[str, float] = {
    "general": 0.30,
    "math_reasoning": 0.40,
    "code": 0.20,
    "multilingual": 0.10,
}
"""An annealing mixture that upsamples high-quality math and code (§3.1.3 describes the practice;
the paper gives no exact weights, so tune these)."""


def normalize_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The weights scaled to sum to 1; every weight must be finite and >= 0, and one > 0."""
    if not weights:
        raise ValueError("weights is empty: give at least one source and its weight")
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"weight of source {name!r} must be a finite number >= 0, got {weight}"
            )
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {dict(weights)}")
    return {name: weight / total for name, weight in weights.items()}


def mix(
    sources: Mapping[str, Iterable[Document]],
    weights: Mapping[str, float],
    *,
    length: Callable[[Document], int] | None = None,
    stop_when_any_exhausted: bool = False,
    max_documents: int | None = None,
) -> Iterator[Document]:
    """Interleave `sources` so each one's share of the output follows `weights`.

    length: the size a document counts for (e.g. its token count); default 1 per document, so the
        shares are of documents. With token counts the shares are of tokens, as in the paper.
    Each emitted document gets `source` set to its source name when it has none.
    """
    missing = sorted(set(weights) - set(sources))
    if missing:
        raise ValueError(f"weights name sources that were not given: {missing}")
    shares = normalize_weights({name: weights.get(name, 0.0) for name in sources})
    iterators = {name: iter(docs) for name, docs in sources.items() if shares[name] > 0}
    emitted = dict.fromkeys(iterators, 0.0)
    size = length or (lambda doc: 1)
    count = 0
    while iterators and (max_documents is None or count < max_documents):
        total = sum(emitted.values())
        live = normalize_weights({name: shares[name] for name in iterators})
        # The source furthest below its target share; ties go to the first listed (deterministic).
        name = min(iterators, key=lambda n: (emitted[n] - live[n] * total) / live[n])
        doc = next(iterators[name], None)
        if doc is None:
            if stop_when_any_exhausted:
                return
            del iterators[name]
            continue
        if not doc.source:
            doc.source = name
        emitted[name] += max(size(doc), 1)
        count += 1
        yield doc
