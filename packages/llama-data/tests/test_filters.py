"""Heuristic filters (§3.1.1): Gopher quality and repetition rules, URL blocklist, dirty words, KL.

Good documents are real English from standard-library docstrings (offline); each bad document is a
good one changed to trip exactly one rule, so the asserted reason is the only failure.
"""

from __future__ import annotations

import base64
import doctest
import hashlib
import importlib
import inspect
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from llama_data.document import Document, StepStats
from llama_data.filters import (
    DirtyWordConfig,
    DirtyWordFilter,
    TokenKLConfig,
    TokenKLFilter,
    UrlBlocklist,
    word_tokens,
)
from llama_data.quality_rules import (
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
    duplicate_ngram_char_fraction,
    gopher_quality_failures,
    gopher_repetition_failures,
    top_ngram_char_fraction,
)

ENGLISH = inspect.getdoc(doctest) or ""
"""~200 words of English prose (with a little code) that passes every Gopher rule."""
PROSE_MODULES = ["copy", "heapq", "pydoc", "timeit", "cmd", "site", "fileinput", "csv", "argparse"]
PROSE_MODULES += ["socket", "hashlib", "unittest", "io", "uuid", "sched", "struct", "doctest"]


def _docstring(module: str) -> str:
    return inspect.getdoc(importlib.import_module(module)) or ""


def _quality(text: str) -> list[str]:
    return gopher_quality_failures(text, GopherQualityConfig())


def _repetition(text: str) -> list[str]:
    return gopher_repetition_failures(text, GopherRepetitionConfig())


def _interleave(words: list[str], phrase: str, count: int) -> str:
    """`words` with `phrase` inserted `count` times at evenly spaced positions (distinct contexts)."""
    step = len(words) // count
    out: list[str] = []
    for i, word in enumerate(words):
        out.append(word)
        if (i + 1) % step == 0 and (i + 1) // step <= count:
            out.append(phrase)
    return " ".join(out)


def _char_fraction(words: list[str], phrase: str, count: int) -> float:
    """Independent oracle: characters of `count` inserted copies of `phrase` over all characters."""
    inserted = count * sum(len(w) for w in phrase.split())
    return inserted / (sum(map(len, words)) + inserted)


# --- Gopher quality -------------------------------------------------------------------------------


@pytest.mark.parametrize("module", PROSE_MODULES)
def test_standard_library_prose_passes_all_gopher_rules(module: str) -> None:
    """Real English documentation trips neither the quality nor the repetition rules."""
    text = _docstring(module)
    assert _quality(text) == []
    assert _repetition(text) == []


def test_gopher_filters_keep_a_good_document_and_count_it() -> None:
    """Both Gopher steps keep good English and count it as kept."""
    stats = StepStats()
    docs = [Document(id="doc", text=ENGLISH)]
    kept = list(GopherRepetitionFilter().run(GopherQualityFilter().run(docs, stats), stats))
    assert [d.id for d in kept] == ["doc"]
    assert stats.kept == 2 and not stats.dropped


def test_too_few_words() -> None:
    """A 40-word excerpt of good prose trips only the 50-word minimum."""
    text = " ".join(ENGLISH.split()[:40])
    assert _quality(text) == ["too_few_words"]
    assert GopherQualityFilter().reason(Document(id="d", text=text)) == "too_few_words"


def test_too_many_words() -> None:
    """A document over 100,000 words trips only the maximum."""
    text = "\n".join(f"the cat number{i} sat with dogs" for i in range(17_000))
    assert len(text.split()) > 100_000
    assert _quality(text) == ["too_many_words"]


def test_mean_word_length_too_long() -> None:
    """Appending many very long words pushes the mean word length above 10 characters."""
    long_words = [f"antidisestablishmentarianism{chr(97 + i % 26)}{i}" for i in range(80)]
    text = ENGLISH + "\n" + " ".join(long_words)
    assert _quality(text) == ["mean_word_length"]


def test_mean_word_length_too_short() -> None:
    """Prose made of two-letter words has a mean word length below 3."""
    text = " ".join(["to be or do it is of an as at"] * 10) + " the and"
    assert _quality(text) == ["mean_word_length"]


def test_hash_ratio() -> None:
    """More '#' symbols than 0.1 per word trips only the hash-symbol ratio."""
    n_words = len(ENGLISH.split())
    text = ENGLISH + "\n" + "#" * (n_words // 10 + 5)
    assert _quality(text) == ["hash_ratio"]


def test_ellipsis_ratio() -> None:
    """Ellipses inside lines, more than 0.1 per word, trip only the ellipsis ratio."""
    words = ENGLISH.split(" ")
    text = " ".join(w + "..." if i % 5 == 0 else w for i, w in enumerate(words))
    assert _quality(text) == ["ellipsis_ratio"]


def test_bullet_lines() -> None:
    """A document whose every line starts with a bullet trips only the bullet-line rule."""
    text = "\n".join(f"• {line.strip()}" for line in ENGLISH.splitlines() if line.strip())
    assert _quality(text) == ["bullet_lines"]


def test_ellipsis_lines() -> None:
    """Half the lines ending in '…' trips only the ellipsis-line rule (the ratio stays low)."""
    lines = [line for line in ENGLISH.splitlines() if line.strip()]
    text = "\n".join(line + " …" if i % 2 == 0 else line for i, line in enumerate(lines))
    assert _quality(text) == ["ellipsis_lines"]


def test_non_alpha_words() -> None:
    """Adding numbers until fewer than 80% of words contain a letter trips only that rule."""
    numbers = " ".join(str(1000 + 7 * i) for i in range(len(ENGLISH.split()) // 2))
    assert _quality(ENGLISH + "\n" + numbers) == ["non_alpha_words"]


def test_missing_stop_words() -> None:
    """Good prose with the eight Gopher stop words removed trips only the stop-word rule."""
    stop = {"the", "be", "to", "of", "and", "that", "have", "with"}
    text = "\n".join(
        " ".join(w for w in line.split() if w.strip(".,:;()\"'").lower() not in stop)
        for line in ENGLISH.splitlines()
    )
    assert _quality(text) == ["missing_stop_words"]


# --- Gopher repetition ----------------------------------------------------------------------------


def test_duplicate_ngram_char_fraction_by_hand() -> None:
    """Covered characters are counted once: in "ab cd ab cd x", the repeated 2-gram covers 8 of 9."""
    words = ["ab", "cd", "ab", "cd", "x"]
    assert duplicate_ngram_char_fraction(words, 2) == pytest.approx(8 / 9)
    assert duplicate_ngram_char_fraction(words, 3) == 0.0
    assert top_ngram_char_fraction(words, 2) == pytest.approx(8 / 9)
    assert top_ngram_char_fraction(["a", "b", "c"], 2) == 0.0  # nothing repeats


def test_duplicate_lines() -> None:
    """A short line after every line: over 30% of lines repeated, few of their characters."""
    lines = [line for line in ENGLISH.splitlines() if line.strip()]
    text = "\n".join(f"{line}\nYes." for line in lines)
    assert _repetition(text) == ["duplicate_lines"]


def test_duplicate_paragraphs() -> None:
    """Short repeated paragraphs: over 30% of paragraphs repeat, lines and characters stay low."""
    one_paragraph = "\n".join(line for line in ENGLISH.splitlines() if line.strip())
    text = "\n\n".join([one_paragraph] + ["Yes, indeed."] * 3)
    assert _repetition(text) == ["duplicate_paragraphs"]


def test_duplicate_line_chars() -> None:
    """A long one-word line repeated 3 times: few repeated lines, but over 20% of characters."""
    lines = [line for line in ENGLISH.splitlines() if line.strip()]
    blob = "https://example.com/" + "a1b2c3d4e5" * 40
    for position in (5, 15, 25):
        lines.insert(position, blob)
    assert _repetition("\n".join(lines)) == ["duplicate_line_chars"]


def test_duplicate_paragraph_chars() -> None:
    """A long one-word paragraph repeated: with the line rules off (a repeated paragraph repeats
    its lines too), only the paragraph-character rule trips."""
    config = GopherRepetitionConfig(
        max_duplicate_line_fraction=1.0, max_duplicate_line_char_fraction=1.0
    )
    paragraphs = [line for line in ENGLISH.splitlines() if line.strip()]
    blob = "https://example.com/" + "a1b2c3d4e5" * 40
    for position in (5, 15, 25):
        paragraphs.insert(position, blob)
    text = "\n\n".join(paragraphs)
    assert gopher_repetition_failures(text, config) == ["duplicate_paragraph_chars"]
    assert _repetition(text)[-1] == "duplicate_paragraph_chars"


@pytest.mark.parametrize(
    ("phrase", "count", "expected"),
    [
        ("New York", 60, "top_2gram_chars"),  # top 2-gram > 0.20
        ("ab cd ef", 40, "top_3gram_chars"),  # top 3-gram > 0.18, its 2-grams <= 0.20
        ("ab cd ef gh", 30, "top_4gram_chars"),  # top 4-gram > 0.16, its 3-grams <= 0.18
    ],
)
def test_top_ngram_char_fraction(phrase: str, count: int, expected: str) -> None:
    """A short phrase repeated in distinct contexts trips only the top n-gram rule of its length."""
    words = ENGLISH.split()
    text = _interleave(words, phrase, count)
    n = len(phrase.split())
    bound = GopherRepetitionConfig().max_top_ngram_char_fraction[n]
    assert _char_fraction(words, phrase, count) > bound
    assert _repetition(text) == [expected]


@pytest.mark.parametrize(
    ("phrase", "target", "expected"),
    [
        ("one two three four five", 0.17, "duplicate_5gram_chars"),  # 0.15 < x, 4-gram <= 0.16
        ("aa bb cc dd ee ff gg hh ii jj", 0.105, "duplicate_10gram_chars"),  # 0.10 < x <= 0.11
    ],
)
def test_duplicate_ngram_coverage(phrase: str, target: float, expected: str) -> None:
    """A phrase of n words covering a given character fraction trips only the n-gram rule(s) whose
    bound it exceeds: a repeated 10-gram at 0.105 exceeds only the 10-gram bound (0.10)."""
    words = ENGLISH.split()
    phrase_chars = sum(len(w) for w in phrase.split())
    count = math.ceil(target * sum(map(len, words)) / ((1 - target) * phrase_chars))
    assert target <= _char_fraction(words, phrase, count) < target + 0.005
    assert _repetition(_interleave(words, phrase, count)) == [expected]


def test_repeated_log_lines_are_dropped() -> None:
    """Unique-looking but repetitive log lines (the Llama 3 motivation) are dropped."""
    log = "\n".join(
        f"2024-05-0{i % 9 + 1} ERROR worker-{i} failed to connect to the database: connection"
        " refused by the remote host after retrying the request"
        for i in range(40)
    )
    assert GopherRepetitionFilter().reason(Document(id="log", text=log)) is not None


def test_repetition_config_rejects_bad_bounds() -> None:
    """An n-gram bound outside [0, 1] is refused with a message naming it."""
    with pytest.raises(ValidationError, match="n-gram bound 5"):
        GopherRepetitionConfig(max_duplicate_ngram_char_fraction={5: 1.5})


# --- URL blocklist --------------------------------------------------------------------------------


def test_url_blocklist_matches_domain_and_subdomains_only() -> None:
    """A listed domain blocks itself and subdomains, not look-alikes or unrelated hosts."""
    blocklist = UrlBlocklist(["bad.example", "*.adult.test", "https://www.other.test/page"])
    assert blocklist.is_blocked("https://bad.example/x")
    assert blocklist.is_blocked("http://www.BAD.example:8080/path?q=1")
    assert blocklist.is_blocked("bad.example/no-scheme")
    assert blocklist.is_blocked("https://a.b.adult.test/")
    assert blocklist.is_blocked("https://www.other.test/")
    assert not blocklist.is_blocked("https://other.test/")  # the www. entry is that host only
    assert not blocklist.is_blocked("https://notbad.example/")
    assert not blocklist.is_blocked("https://bad.example.org/")


def test_url_blocklist_reason_and_missing_url() -> None:
    """Blocked documents drop with "url_blocklist"; documents without a URL are kept."""
    blocklist = UrlBlocklist(["bad.example"])
    docs = [
        Document(id="1", text="x", url="https://sub.bad.example/a"),
        Document(id="2", text="x", url="https://good.example/a"),
        Document(id="3", text="x"),
    ]
    stats = StepStats()
    assert [d.id for d in blocklist.run(docs, stats)] == ["2", "3"]
    assert stats.dropped == {"url_blocklist": 1} and stats.kept == 2


def test_url_blocklist_from_file_with_comments(tmp_path: Path) -> None:
    """Files hold one domain per line with '#' comments; several files are merged."""
    first = tmp_path / "adult.txt"
    first.write_text("# adult domains\nbad.example  # inline comment\n\nBücher.test\n")
    second = tmp_path / "pii.txt"
    second.write_text("people-search.test\n")
    blocklist = UrlBlocklist.from_file(first, str(second))
    assert blocklist.domains == {"bad.example", "xn--bcher-kva.test", "people-search.test"}
    assert blocklist.is_blocked("https://bücher.test/")
    assert UrlBlocklist(first).domains == {"bad.example", "xn--bcher-kva.test"}


def test_url_blocklist_errors_name_the_problem(tmp_path: Path) -> None:
    """A bare string and a malformed line are refused with messages that say what to do."""
    with pytest.raises(TypeError, match="from_file"):
        UrlBlocklist("bad.example")
    path = tmp_path / "list.txt"
    path.write_text("good.example\nnot a domain\n")
    with pytest.raises(ValueError, match=r"list\.txt:2"):
        UrlBlocklist.from_file(path)


# --- Dirty words ----------------------------------------------------------------------------------


def test_dirty_words_match_whole_words_case_insensitively() -> None:
    """Listed words count on word boundaries in any case; phrases match across whitespace."""
    dirty = DirtyWordFilter(["darn", "heck", "gosh darn it"])
    assert dirty.count("Darn! What the HECK, darn-it.") == 3
    assert dirty.count("Gosh   darn it") == 1  # the phrase, not also its word
    assert dirty.count("darnation, checkered, heckle") == 0


def test_dirty_words_default_is_c4_any_word_drops() -> None:
    """With C4's default (max_count=0) one listed word drops the document as "dirty_words"."""
    dirty = DirtyWordFilter(["darn"])
    assert dirty.reason(Document(id="1", text=ENGLISH + " darn")) == "dirty_words"
    assert dirty.reason(Document(id="2", text=ENGLISH)) is None


def test_dirty_words_count_and_fraction_bounds(tmp_path: Path) -> None:
    """Counting mode keeps documents at the bound and drops those above the count or fraction."""
    path = tmp_path / "words.txt"
    path.write_text("# list\ndarn\n")
    by_count = DirtyWordFilter.from_file(path, DirtyWordConfig(max_count=2))
    assert by_count.reason(Document(id="1", text="darn darn fine")) is None
    assert by_count.reason(Document(id="2", text="darn darn darn")) == "dirty_words"
    by_fraction = DirtyWordFilter(["darn"], DirtyWordConfig(max_count=None, max_fraction=0.01))
    assert by_fraction.reason(Document(id="3", text=ENGLISH + " darn")) is None
    assert by_fraction.reason(Document(id="4", text="darn it all")) == "dirty_words"


# --- Token-distribution KL divergence -------------------------------------------------------------


def _base64_blob(n_tokens: int) -> str:
    digests = (hashlib.sha256(str(i).encode()).digest() for i in range(n_tokens))
    return " ".join(base64.b64encode(d).decode() for d in digests)


def test_kl_score_matches_hand_computation() -> None:
    """KL(doc || add-one smoothed corpus) with an unseen bucket equals the closed form."""
    kl = TokenKLFilter(TokenKLConfig(max_percentile=None, max_divergence=1.0))
    kl.fit_reference({"a": 3, "b": 1})
    # P_corpus over {a, b, unseen}: (3+1)/7, (1+1)/7, 1/7. P_doc of "a zzz": a 1/2, unseen 1/2.
    expected = 0.5 * math.log(0.5 / (4 / 7)) + 0.5 * math.log(0.5 / (1 / 7))
    assert kl.score("a zzz") == pytest.approx(expected, rel=1e-12)
    assert kl.score("") == 0.0


def test_kl_filter_drops_only_the_outlier_document() -> None:
    """Fit on normal prose plus one base64 blob; only the blob drops, far above the rest."""
    corpus = [Document(id=m, text=_docstring(m)) for m in PROSE_MODULES]
    # A small blob: in a sample this small, a large one would itself be a big share of the corpus.
    corpus.insert(7, Document(id="blob", text=_base64_blob(20)))
    # 18 documents: the 95th percentile lies between the two highest scores (linear interpolation).
    kl = TokenKLFilter(TokenKLConfig(max_percentile=95.0)).fit(d.text for d in corpus)
    stats = StepStats()
    kept = [d.id for d in kl.run(corpus, stats)]
    assert kept == PROSE_MODULES
    assert stats.dropped == {"token_kl_divergence": 1}
    normal_max = max(kl.score(_docstring(m)) for m in PROSE_MODULES)
    assert kl.score(_base64_blob(20)) > 2 * normal_max  # far apart, not a near tie


def test_kl_filter_drops_a_repeated_rare_token() -> None:
    """Against a distribution fit on normal prose, a document repeating a rare token drops."""
    normal = [_docstring(m) for m in PROSE_MODULES]
    kl = TokenKLFilter(TokenKLConfig(max_percentile=100.0)).fit(normal)
    assert kl.threshold == pytest.approx(max(kl.score(t) for t in normal))
    rare = " ".join(["zyzzyva"] * 150 + ENGLISH.split()[:50])
    assert kl.reason(Document(id="rare", text=rare)) == "token_kl_divergence"
    assert all(kl.reason(Document(id="n", text=t)) is None for t in normal)


def test_kl_filter_is_deterministic_and_takes_any_tokenizer() -> None:
    """Two fits give identical scores; a character tokenizer works like the word default."""
    texts = [_docstring(m) for m in PROSE_MODULES[:6]]
    first = TokenKLFilter().fit(texts)
    second = TokenKLFilter().fit(texts)
    assert [first.score(t) for t in texts] == [second.score(t) for t in texts]
    assert first.threshold == second.threshold
    chars = TokenKLFilter(tokenizer=list).fit(texts)
    assert chars.score(_base64_blob(20)) > max(chars.score(t) for t in texts)
    assert word_tokens("Hello, World_1!") == ["hello", "world_1"]


def test_kl_filter_fixed_threshold_and_errors() -> None:
    """A fixed divergence needs no calibration; unfitted use and ambiguous configs fail loudly."""
    with pytest.raises(RuntimeError, match="fit"):
        TokenKLFilter().reason(Document(id="1", text="x"))
    with pytest.raises(ValidationError, match="exactly one"):
        TokenKLConfig(max_divergence=2.0)
    with pytest.raises(ValueError, match="calibrate"):
        TokenKLFilter().fit_reference({"a": 1})
    kl = TokenKLFilter(TokenKLConfig(max_percentile=None, max_divergence=3.0))
    kl.fit([ENGLISH])
    assert kl.reason(Document(id="ok", text=ENGLISH)) is None
    assert kl.reason(Document(id="bad", text=_base64_blob(50))) == "token_kl_divergence"
