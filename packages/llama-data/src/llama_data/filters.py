"""URL, dirty-word and token-distribution filters (§3.1.1 of the Llama 3 paper).

The paper's "PII and safety filtering" drops documents "from websites ... known to contain adult
content", which `UrlBlocklist` does against a user domain list. Its "Heuristic filtering" names three
heuristics; the Gopher n-gram repetition rules live in `quality_rules.py`, the other two here:

- `DirtyWordFilter`: "dirty word" counting (Raffel et al. 2020, "Exploring the Limits of Transfer
  Learning with a Unified Text-to-Text Transformer", the C4 filter) "to filter out adult websites
  that are not covered by domain block lists".
- `TokenKLFilter`: "token-distribution Kullback-Leibler divergence to filter out documents containing
  excessive numbers of outlier tokens compared to the training corpus distribution".

No word or domain list ships with the package: users pass their own (e.g. the LDNOOBW list that C4
used, or the UT1 blocklists), one entry per line, '#' starting a comment.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_data.document import Document, Filter

__all__ = [
    "DirtyWordConfig",
    "DirtyWordFilter",
    "TokenKLConfig",
    "TokenKLFilter",
    "UrlBlocklist",
    "read_list_file",
    "word_tokens",
]

Tokenizer = Callable[[str], Sequence[Hashable]]


def read_list_file(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(line number, entry) for each non-empty line of a UTF-8 list file; '#' starts a comment."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                entries.append((number, entry))
    return entries


def _refuse_bare_string(value: object, what: str, cls: str) -> None:
    if isinstance(value, str):
        raise TypeError(
            f"{cls} got the string {value!r}; pass a list of {what}, a pathlib.Path to a file of"
            f" them, or use {cls}.from_file(path)"
        )


# --- URL blocklist ------------------------------------------------------------------------------


def _ascii_host(host: str) -> str:
    """Lower-case host without a trailing dot, internationalized names in punycode where possible."""
    host = host.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:  # labels the idna codec rejects (too long, empty): compare as written
        return host


def url_host(url: str) -> str | None:
    """The normalized host of `url` (scheme optional), or None when there is none or it is malformed."""
    try:
        host = urlsplit(url if "//" in url else "//" + url).hostname
    except ValueError:
        return None
    return _ascii_host(host) if host else None


class UrlBlocklist(Filter):
    """Drops documents whose URL host is a listed domain or a subdomain of one ("url_blocklist").

    "example.com" blocks example.com and www.example.com, not notexample.com. Entries may be written
    as domains, "*.domain", or URLs (their host is used). Documents without a URL are kept.
    """

    name = "url_blocklist"

    def __init__(self, domains: Iterable[str] | os.PathLike[str]) -> None:
        _refuse_bare_string(domains, "domains", "UrlBlocklist")
        if isinstance(domains, os.PathLike):
            entries = [(f"{os.fspath(domains)}:{n}", e) for n, e in read_list_file(domains)]
        else:
            entries = [(f"entry {i}", d) for i, d in enumerate(domains)]
        self.domains: frozenset[str] = frozenset(self._normalize(where, d) for where, d in entries)

    @classmethod
    def from_file(cls, *paths: str | os.PathLike[str]) -> UrlBlocklist:
        """A blocklist of the domains in one or more files (one per line, '#' comments)."""
        domains: set[str] = set()
        for path in paths:
            domains |= UrlBlocklist(Path(path)).domains
        return cls(sorted(domains))

    @staticmethod
    def _normalize(where: str, entry: str) -> str:
        domain = entry.strip()
        if "://" in domain:
            domain = url_host(domain) or ""
        domain = _ascii_host(domain.removeprefix("*.").lstrip("."))
        if not domain or any(c.isspace() or c in "/:@" for c in domain):
            raise ValueError(
                f"blocklist {where}: {entry!r} is not a domain; write one domain per line"
                " (e.g. 'example.com'), '#' for comments"
            )
        return domain

    def is_blocked(self, url: str) -> bool:
        """Whether the host of `url` is a listed domain or one of its subdomains."""
        host = url_host(url)
        if host is None:
            return False
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))

    def reason(self, doc: Document) -> str | None:
        return "url_blocklist" if doc.url and self.is_blocked(doc.url) else None


# --- Dirty words (C4) ---------------------------------------------------------------------------


class DirtyWordConfig(BaseModel):
    """When `DirtyWordFilter` drops a document; a document is dropped if any set bound is exceeded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_count: int | None = Field(default=0, ge=0)
    """Most listed-word occurrences allowed. 0 is C4's rule (Raffel et al. 2020, §2.2: discard any
    page containing a word of the list), which is aggressive; raise it to count rather than ban."""
    max_fraction: float | None = Field(default=None, ge=0, le=1)
    """Most listed-word occurrences per whitespace-separated word; None to not use a fraction."""

    @model_validator(mode="after")
    def _one_bound(self) -> Self:
        if self.max_count is None and self.max_fraction is None:
            raise ValueError("set max_count or max_fraction (or both); with neither nothing drops")
        return self


class DirtyWordFilter(Filter):
    """Counts listed words and phrases (case-insensitive, whole words only) and drops "dirty_words".

    Matching is on word boundaries: "ass" matches "Ass!" but not "class". This fits space-separated
    scripts; in Chinese or Japanese, where words are not delimited, an entry only matches when it is
    not adjacent to other word characters, so lists for those languages under-count.
    """

    name = "dirty_words"

    def __init__(
        self, words: Iterable[str] | os.PathLike[str], config: DirtyWordConfig | None = None
    ) -> None:
        _refuse_bare_string(words, "words", "DirtyWordFilter")
        if isinstance(words, os.PathLike):
            entries = [e for _, e in read_list_file(words)]
        else:
            entries = [w.strip() for w in words if w.strip()]
        if not entries:
            raise ValueError("DirtyWordFilter needs at least one word; the list given is empty")
        self.config = config or DirtyWordConfig()
        self.words = tuple(sorted({w.lower() for w in entries}, key=lambda w: (-len(w), w)))
        # Longest first so a phrase wins over a word it contains; lookarounds instead of \b so
        # entries that begin or end with a non-word character ("f*ck") still match whole.
        alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in self.words)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], config: DirtyWordConfig | None = None
    ) -> DirtyWordFilter:
        """A filter for the words in `path` (one word or phrase per line, '#' comments)."""
        return cls(Path(path), config)

    def count(self, text: str) -> int:
        """Non-overlapping occurrences of listed words and phrases in `text`."""
        return sum(1 for _ in self._pattern.finditer(text))

    def reason(self, doc: Document) -> str | None:
        count = self.count(doc.text)
        if self.config.max_count is not None and count > self.config.max_count:
            return "dirty_words"
        fraction = count / max(1, len(doc.text.split()))
        if self.config.max_fraction is not None and fraction > self.config.max_fraction:
            return "dirty_words"
        return None


# --- Token-distribution KL divergence -----------------------------------------------------------

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lower-cased runs of word characters: the default unigram tokens of `TokenKLFilter`."""
    return _WORD.findall(text.lower())


class _Unseen:
    """The one bucket every token absent from the reference corpus falls into."""

    def __repr__(self) -> str:
        return "<unseen>"


UNSEEN = _Unseen()


class TokenKLConfig(BaseModel):
    """How `TokenKLFilter` smooths the corpus distribution and where it cuts.

    The Llama 3 paper gives no threshold; the percentile default is this package's choice.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    smoothing: float = Field(default=1.0, gt=0)
    """Add-alpha (Lidstone) constant: P(t) = (count(t) + alpha) / (N + alpha * (V + 1)) over the V
    corpus tokens plus one "unseen" bucket, so every document token has a non-zero probability."""
    max_divergence: float | None = Field(default=None, gt=0)
    """Fixed threshold in nats; documents above it drop. Exclusive with `max_percentile`."""
    max_percentile: float | None = Field(default=99.0, gt=0, le=100)
    """Drop documents above this percentile of the divergences of the fit sample (99: the most
    divergent ~1%). Exclusive with `max_divergence`."""
    min_tokens: int = Field(default=1, ge=1)
    """Documents with fewer tokens are not scored and kept (other rules handle short documents)."""

    @model_validator(mode="after")
    def _one_threshold(self) -> Self:
        if (self.max_divergence is None) == (self.max_percentile is None):
            raise ValueError(
                "set exactly one of max_divergence (nats) or max_percentile (of the fit sample);"
                f" got max_divergence={self.max_divergence}, max_percentile={self.max_percentile}"
            )
        return self


class TokenKLFilter(Filter):
    """Drops documents whose unigram distribution diverges from the corpus ("token_kl_divergence").

    score(doc) = KL(P_doc || P_corpus) = sum_t P_doc(t) * log(P_doc(t) / P_corpus(t)), in nats, where
    P_doc is the document's empirical unigram distribution with tokens unseen in the corpus merged
    into one "unseen" bucket, and P_corpus is the add-alpha smoothed corpus distribution over the same
    V + 1 outcomes (`TokenKLConfig.smoothing`). The direction KL(doc || corpus) is the one that grows
    with document tokens that are rare or absent in the corpus: base64 blobs, a repeated rare token.

    Short documents have low entropy and so score higher than long ones of the same style; fit on a
    sample that is representative in length, or use `min_tokens`. Outliers inside the fit sample
    shape the reference too: fit on a sample large enough that any one document is a negligible
    share of its tokens, or on trusted text via `fit_reference`.

    Use: `TokenKLFilter(config).fit(sample_texts)` (distribution and percentile threshold from one
    sample), or `.fit_reference(counts, calibration_texts)` with a known distribution. Everything is
    counting and sorted percentiles, so results are deterministic.
    """

    name = "token_kl"

    def __init__(self, config: TokenKLConfig | None = None, tokenizer: Tokenizer = word_tokens):
        self.config = config or TokenKLConfig()
        self.tokenizer = tokenizer
        self._log_prob: dict[Hashable, float] = {}
        self._log_prob_unseen = 0.0
        self.threshold: float | None = self.config.max_divergence
        """Documents scoring above this drop; set by `fit` in percentile mode."""

    def fit(self, texts: Iterable[str]) -> Self:
        """Count the corpus distribution over `texts`; in percentile mode, set the threshold too."""
        token_lists = [self.tokenizer(text) for text in texts]
        counts: Counter[Hashable] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        self._set_reference(counts)
        self._calibrate(token_lists)
        return self

    def fit_reference(
        self, counts: Mapping[Hashable, float], calibration_texts: Iterable[str] = ()
    ) -> Self:
        """Use a given distribution (token counts, or weights in the same units as the smoothing
        constant); in percentile mode the threshold comes from `calibration_texts`."""
        self._set_reference(counts)
        self._calibrate([self.tokenizer(text) for text in calibration_texts])
        return self

    def _set_reference(self, counts: Mapping[Hashable, float]) -> None:
        if not counts or any(c < 0 for c in counts.values()):
            raise ValueError(
                "the reference distribution must hold at least one token, all counts non-negative"
            )
        alpha = self.config.smoothing
        total = math.fsum(counts.values()) + alpha * (len(counts) + 1)
        self._log_prob = {t: math.log((c + alpha) / total) for t, c in counts.items()}
        self._log_prob_unseen = math.log(alpha / total)

    def _calibrate(self, token_lists: Sequence[Sequence[Hashable]]) -> None:
        if self.config.max_percentile is None:
            return
        scores = [
            self._score_tokens(tokens)
            for tokens in token_lists
            if len(tokens) >= self.config.min_tokens
        ]
        if not scores:
            raise ValueError(
                "percentile mode needs sample documents to calibrate on (each with at least"
                f" min_tokens={self.config.min_tokens} tokens); pass them, or set max_divergence"
            )
        self.threshold = float(np.percentile(np.asarray(scores), self.config.max_percentile))

    def _score_tokens(self, tokens: Sequence[Hashable]) -> float:
        doc_counts = Counter(t if t in self._log_prob else UNSEEN for t in tokens)
        n = len(tokens)
        return math.fsum(
            (c / n) * (math.log(c / n) - self._log_prob.get(t, self._log_prob_unseen))
            for t, c in doc_counts.items()
        )

    def score(self, text: str) -> float:
        """KL(P_doc || P_corpus) of `text` in nats (0.0 for text with no tokens)."""
        if not self._log_prob:
            raise RuntimeError("TokenKLFilter is not fitted; call fit() or fit_reference() first")
        tokens = self.tokenizer(text)
        return self._score_tokens(tokens) if tokens else 0.0

    def reason(self, doc: Document) -> str | None:
        if self.threshold is None or not self._log_prob:
            raise RuntimeError("TokenKLFilter is not fitted; call fit() or fit_reference() first")
        tokens = self.tokenizer(doc.text)
        if len(tokens) < self.config.min_tokens:
            return None
        return "token_kl_divergence" if self._score_tokens(tokens) > self.threshold else None
