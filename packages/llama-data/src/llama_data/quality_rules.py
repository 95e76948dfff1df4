"""Gopher quality and repetition rules (§3.1.1 of the Llama 3 paper, "Heuristic filtering").

Llama 3 removes low-quality web documents with heuristics, among them the "duplicated n-gram
coverage ratio (Rae et al., 2021) to remove lines that consist of repeated content such as logging or
error messages". Both rule sets here come from Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher" (arXiv 2112.11446), Appendix A.1.1:

- `GopherQualityFilter`: word count, mean word length, '#' and ellipsis ratios, bullet and ellipsis
  lines, words with a letter, and English stop words ("Quality filtering").
- `GopherRepetitionFilter`: duplicated lines and paragraphs, the top 2-4-gram character fraction and
  the duplicated 5-10-gram character coverage ("Repetition removal", Table A1).

Each rule drops under its own reason, and the first failing rule (in the order listed in the config)
is the one recorded. Words are whitespace-separated tokens, as in MassiveWeb; the rules were tuned on
English and are meant for text in space-separated scripts (route by language first, `langid.py`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llama_data.document import Document, Filter

__all__ = [
    "GopherQualityConfig",
    "GopherQualityFilter",
    "GopherRepetitionConfig",
    "GopherRepetitionFilter",
    "duplicate_ngram_char_fraction",
    "gopher_quality_failures",
    "gopher_quality_reason",
    "gopher_repetition_failures",
    "gopher_repetition_reason",
    "top_ngram_char_fraction",
]

# Rae et al. 2021, App. A.1.1: "does not contain at least two of the following English words".
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "●", "○", "◦", "▪", "‣", "·", "-", "*")
ELLIPSES = ("...", "…")
_PUNCTUATION = "\"'`.,;:!?()[]{}<>«»“”‘’"


class GopherQualityConfig(BaseModel):
    """Thresholds of the Gopher quality filter; every default is from Rae et al. 2021, App. A.1.1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_words: int = Field(default=50, ge=0)
    """Drop documents with fewer words ("fewer than 50 ... words")."""
    max_words: int = Field(default=100_000, ge=1)
    """Drop documents with more words ("... or greater than 100,000 words")."""
    min_mean_word_length: float = Field(default=3.0, ge=0)
    """Drop documents whose mean word length (punctuation stripped) is below this (3 characters)."""
    max_mean_word_length: float = Field(default=10.0, gt=0)
    """... or above this (10 characters)."""
    max_hash_ratio: float = Field(default=0.1, ge=0)
    """Most '#' symbols per word ("symbol-to-word ratio greater than 0.1" for the hash symbol)."""
    max_ellipsis_ratio: float = Field(default=0.1, ge=0)
    """Most ellipses ('...' or '…') per word (the same 0.1 bound, for the ellipsis)."""
    max_bullet_line_fraction: float = Field(default=0.9, ge=0, le=1)
    """Most lines starting with a bullet point ("more than 90% of lines starting with a bullet")."""
    max_ellipsis_line_fraction: float = Field(default=0.3, ge=0, le=1)
    """Most lines ending with an ellipsis ("more than 30% ending with an ellipsis")."""
    min_alpha_word_fraction: float = Field(default=0.8, ge=0, le=1)
    """Fewest words with an alphabetic character ("80% of words ... at least one alphabetic")."""
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    """Lower-case stop words whose presence marks natural language (the Gopher eight)."""
    min_stop_words: int = Field(default=2, ge=0)
    """Fewest stop-word occurrences, case-insensitive ("at least two of" the stop words; datatrove
    0.10.1 counts distinct, case-sensitive ones instead)."""


class GopherRepetitionConfig(BaseModel):
    """Thresholds of the Gopher repetition filter; defaults are Table A1 of Rae et al. 2021."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_duplicate_line_fraction: float = Field(default=0.30, ge=0, le=1)
    """Most lines (by count) that repeat an earlier line (Table A1: 0.30)."""
    max_duplicate_paragraph_fraction: float = Field(default=0.30, ge=0, le=1)
    """Most paragraphs (blank-line separated) that repeat an earlier one (Table A1: 0.30)."""
    max_duplicate_line_char_fraction: float = Field(default=0.20, ge=0, le=1)
    """Most characters in repeated lines (Table A1: 0.20)."""
    max_duplicate_paragraph_char_fraction: float = Field(default=0.20, ge=0, le=1)
    """Most characters in repeated paragraphs (Table A1: 0.20)."""
    max_top_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    """n -> most characters covered by the most frequent word n-gram (Table A1, n = 2..4)."""
    max_duplicate_ngram_char_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    """n -> most characters covered by word n-grams that occur more than once (Table A1, n = 5..10)."""

    @field_validator("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
    @classmethod
    def _check_ngram_bounds(cls, bounds: dict[int, float]) -> dict[int, float]:
        for n, bound in bounds.items():
            if n < 1 or not 0.0 <= bound <= 1.0:
                raise ValueError(
                    f"n-gram bound {n}: {bound} is invalid; n must be >= 1 and the bound a"
                    " fraction in [0, 1] (e.g. {5: 0.15})"
                )
        return bounds


def _strip_punctuation(word: str) -> str:
    return word.strip(_PUNCTUATION)


def gopher_quality_failures(text: str, config: GopherQualityConfig) -> list[str]:
    """Every Gopher quality rule `text` fails, as drop reasons in the order of the config fields."""
    words = text.split()
    n_words = len(words)
    failures = []
    if n_words < config.min_words:
        failures.append("too_few_words")
    if n_words > config.max_words:
        failures.append("too_many_words")
    stripped = [w for w in (_strip_punctuation(w) for w in words) if w]
    mean_length = sum(map(len, stripped)) / len(stripped) if stripped else 0.0
    if not config.min_mean_word_length <= mean_length <= config.max_mean_word_length:
        failures.append("mean_word_length")
    per_word = 1 / max(1, n_words)
    if text.count("#") * per_word > config.max_hash_ratio:
        failures.append("hash_ratio")
    if sum(text.count(e) for e in ELLIPSES) * per_word > config.max_ellipsis_ratio:
        failures.append("ellipsis_ratio")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    per_line = 1 / max(1, len(lines))
    if sum(line.startswith(BULLETS) for line in lines) * per_line > config.max_bullet_line_fraction:
        failures.append("bullet_lines")
    if (
        sum(line.endswith(ELLIPSES) for line in lines) * per_line
        > config.max_ellipsis_line_fraction
    ):
        failures.append("ellipsis_lines")
    alpha_words = sum(any(c.isalpha() for c in w) for w in words)
    if n_words and alpha_words / n_words < config.min_alpha_word_fraction:
        failures.append("non_alpha_words")
    stop_words = frozenset(w.lower() for w in config.stop_words)
    if sum(_strip_punctuation(w).lower() in stop_words for w in words) < config.min_stop_words:
        failures.append("missing_stop_words")
    return failures


def gopher_quality_reason(text: str, config: GopherQualityConfig) -> str | None:
    """The first Gopher quality rule `text` fails, as a drop reason, or None if it passes them all."""
    failures = gopher_quality_failures(text, config)
    return failures[0] if failures else None


def _duplicate_fractions(chunks: Sequence[str]) -> tuple[float, float]:
    """(fraction of chunks that repeat an earlier chunk, fraction of their characters)."""
    if not chunks:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for chunk in chunks:
        if chunk in seen:
            dup_count += 1
            dup_chars += len(chunk)
        else:
            seen.add(chunk)
    total_chars = sum(map(len, chunks))
    return dup_count / len(chunks), (dup_chars / total_chars if total_chars else 0.0)


def top_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (all its occurrences) over all characters.

    Characters are those of the words (whitespace excluded). An n-gram seen once covers nothing: the
    rule targets repetition. Ties go to the n-gram seen first, so the result is deterministic.
    """
    total_chars = sum(map(len, words))
    if len(words) < n or total_chars == 0:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    top, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return min(1.0, sum(map(len, top)) * count / total_chars)


def duplicate_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Characters of the words inside any word n-gram that occurs more than once, over all characters.

    Each word is counted once however many duplicated n-grams cover it ("without double counting",
    Rae et al. 2021): every occurrence of a repeated n-gram marks its words, then marked characters
    are summed.
    """
    total_chars = sum(map(len, words))
    if len(words) < n or total_chars == 0:
        return 0.0
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(ngrams)
    covered = [False] * len(words)
    for start, gram in enumerate(ngrams):
        if counts[gram] > 1:
            covered[start : start + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


def gopher_repetition_failures(text: str, config: GopherRepetitionConfig) -> list[str]:
    """Every Gopher repetition rule `text` fails, as drop reasons in the order of the config fields.

    Lines are non-blank lines, paragraphs are separated by blank lines, both whitespace-stripped;
    n-grams are over whitespace-separated words.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_frac, line_char_frac = _duplicate_fractions(lines)
    para_frac, para_char_frac = _duplicate_fractions(paragraphs)
    failures = []
    if line_frac > config.max_duplicate_line_fraction:
        failures.append("duplicate_lines")
    if para_frac > config.max_duplicate_paragraph_fraction:
        failures.append("duplicate_paragraphs")
    if line_char_frac > config.max_duplicate_line_char_fraction:
        failures.append("duplicate_line_chars")
    if para_char_frac > config.max_duplicate_paragraph_char_fraction:
        failures.append("duplicate_paragraph_chars")
    words = text.split()
    for n, bound in sorted(config.max_top_ngram_char_fraction.items()):
        if top_ngram_char_fraction(words, n) > bound:
            failures.append(f"top_{n}gram_chars")
    for n, bound in sorted(config.max_duplicate_ngram_char_fraction.items()):
        if duplicate_ngram_char_fraction(words, n) > bound:
            failures.append(f"duplicate_{n}gram_chars")
    return failures


def gopher_repetition_reason(text: str, config: GopherRepetitionConfig) -> str | None:
    """The first Gopher repetition rule `text` fails, as a drop reason, or None if it passes."""
    failures = gopher_repetition_failures(text, config)
    return failures[0] if failures else None


class GopherQualityFilter(Filter):
    """Drops documents failing a Gopher quality rule; the reason names the rule (e.g. "hash_ratio")."""

    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig | None = None) -> None:
        self.config = config or GopherQualityConfig()

    def reason(self, doc: Document) -> str | None:
        return gopher_quality_reason(doc.text, self.config)


class GopherRepetitionFilter(Filter):
    """Drops repetitive documents (duplicated lines, paragraphs or n-grams), one reason per rule."""

    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig | None = None) -> None:
        self.config = config or GopherRepetitionConfig()

    def reason(self, doc: Document) -> str | None:
        return gopher_repetition_reason(doc.text, self.config)
