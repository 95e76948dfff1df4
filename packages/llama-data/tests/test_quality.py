"""Model-based quality filtering (§3.1.1): the numpy fastText classifier and QualityFilter."""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_data.document import Document, StepStats
from llama_data.quality import FastTextClassifier, QualityFilter, fasttext_hash

HQ, LQ = "__label__hq", "__label__lq"

# Reference-quality text: docstrings of standard-library modules and their public members.
_STDLIB = [
    "argparse", "bisect", "calendar", "collections", "csv", "datetime", "decimal", "difflib",
    "fractions", "functools", "heapq", "itertools", "json", "logging", "pathlib", "random",
    "statistics", "string", "textwrap", "urllib.parse", "zipfile", "tarfile", "gzip", "shutil",
]  # fmt: skip

_SPAM_WORDS = [
    "click", "here", "buy", "now", "cheap", "best", "price", "free", "shipping", "limited",
    "offer", "deal", "discount", "sale", "online", "order", "today", "win", "prize", "casino",
    "bonus", "viagra", "pills", "loans", "fast", "cash", "crypto", "guaranteed", "amazing",
    "subscribe", "like", "share", "follow", "top", "10", "hot", "sexy", "singles", "download",
    "free", "mp3", "watch", "full", "movie", "hd",
]  # fmt: skip
_SEO_TOPICS = [
    "shoes", "watches", "phones", "laptops", "hotels", "flights", "insurance", "bags", "jeans",
    "shirts",
]  # fmt: skip
_COMMON = [
    "the", "a", "for", "and", "of", "to", "in", "is", "you", "your", "with", "on", "this", "that",
]  # fmt: skip


def _reference_paragraphs() -> list[str]:
    paragraphs: list[str] = []
    for name in _STDLIB:
        module = importlib.import_module(name)
        objects = [module] + [
            getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")
        ]
        for obj in objects:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            for paragraph in (doc or "").split("\n\n"):
                if len(paragraph.split()) >= 8 and paragraph not in paragraphs:
                    paragraphs.append(paragraph)
    return paragraphs


def _spam_line(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:  # spammy sentence with some common words
        words = rng.choices(_SPAM_WORDS + _COMMON, k=rng.randint(8, 30))
    elif kind == 1:  # SEO keyword list
        topic = rng.choice(_SEO_TOPICS)
        words = []
        for _ in range(rng.randint(3, 8)):
            words += [
                rng.choice(["best", "cheap", "buy", "top", "sale"]),
                topic,
                rng.choice(_COMMON),
            ]
    else:  # repeated tokens
        words = [rng.choice(_SPAM_WORDS)] * rng.randint(5, 15) + rng.choices(_SPAM_WORDS, k=5)
    return " ".join(words)


@pytest.fixture(scope="module")
def quality_data() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) examples of reference-quality vs spam text, shuffled with a fixed seed."""
    rng = random.Random(0)
    reference = _reference_paragraphs()
    examples = [(text, HQ) for text in reference]
    examples += [(_spam_line(rng), LQ) for _ in range(len(reference))]
    rng.shuffle(examples)
    split = int(0.8 * len(examples))
    return examples[:split], examples[split:]


@pytest.fixture(scope="module")
def small_model(
    quality_data: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> FastTextClassifier:
    return FastTextClassifier.train(quality_data[0], bucket=2**14, dim=16, seed=1)


def _order_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """Every text holds "not" and "good" once among fillers; the label is only their order."""
    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(50)]
    examples = []
    for _ in range(n):
        words = rng.sample(filler, rng.randint(3, 8))
        at = rng.randint(0, len(words))
        not_first = rng.random() < 0.5
        pair = ["not", "good"] if not_first else ["good", "not"]
        examples.append((" ".join(words[:at] + pair + words[at:]), "ng" if not_first else "gn"))
    return examples


def _accuracy(model: FastTextClassifier, examples: list[tuple[str, str]]) -> float:
    return float(np.mean([model.predict(text)[0][0] == label for text, label in examples]))


def test_fnv1a_hash_matches_published_vectors() -> None:
    """fasttext_hash is 32-bit FNV-1a on ASCII (test vectors from the FNV reference suite)."""
    assert fasttext_hash("") == 0x811C9DC5
    assert fasttext_hash("a") == 0xE40C292C
    assert fasttext_hash("foobar") == 0xBF9CF968


def test_learns_reference_text_vs_spam_with_default_settings(
    quality_data: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> None:
    """With fastText's defaults (bucket 2**20, dim 64), held-out accuracy is at least 0.9."""
    train, held_out = quality_data
    model = FastTextClassifier.train(train)
    accuracy = _accuracy(model, held_out)
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f} on {len(held_out)} examples"
    assert model.input_matrix.shape == (len(model.words) + 2**20, 64)


def test_word_bigrams_solve_an_order_only_task() -> None:
    """A label set only by word order is learned with word_ngrams=2 and not with word_ngrams=1."""
    train, held_out = _order_examples(1000, seed=0), _order_examples(300, seed=1)
    bigram = _accuracy(FastTextClassifier.train(train, word_ngrams=2, bucket=2**16), held_out)
    unigram = _accuracy(FastTextClassifier.train(train, word_ngrams=1), held_out)
    assert bigram >= 0.95, f"word_ngrams=2 held-out accuracy {bigram:.3f}"
    assert unigram <= 0.65, f"word_ngrams=1 held-out accuracy {unigram:.3f} (chance is 0.5)"


def test_matches_fasttext_predict_on_an_exported_model(
    small_model: FastTextClassifier,
    quality_data: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """fastText's own C++ predict (fasttext-predict) on the exported .bin gives our probabilities.

    This checks tokenization, the FNV-1a word hash (with its sign extension of non-ASCII bytes), the
    n-gram bucket hash, the mean hidden vector and the softmax against an independent implementation.
    """
    path = tmp_path / "model.bin"
    small_model.export_fasttext(path)
    texts = [text.replace("\n", " ") for text, _ in quality_data[1][:40]]
    texts += ["café naïve 東京 Ünïcödé words here", "", "click here buy now", "Return the value"]
    script = (
        "import json, sys, fasttext; m = fasttext.load_model(sys.argv[1]);"
        " texts = json.loads(sys.stdin.read());"
        " print(json.dumps([dict(zip(*m.predict(t, k=2))) for t in texts]))"
    )
    # A subprocess: fasttext-predict's C++ loader may write to stderr, which pytest would capture.
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(result.stdout)
    ours = small_model.predict_proba(texts)
    for text, their_probs, our_probs in zip(texts, theirs, ours, strict=True):
        expected = np.array([their_probs[label] for label in small_model.labels])
        # fastText reports exp(log(p + 1e-5)), i.e. p + 1e-5; float32 sums differ in the last bits.
        np.testing.assert_allclose(our_probs, expected, atol=2e-5, err_msg=text)


def test_same_seed_gives_identical_models_and_another_seed_does_not() -> None:
    """Training is deterministic given the seed (initialisation and example order)."""
    examples = _order_examples(200, seed=0)
    first = FastTextClassifier.train(examples, bucket=2**10, dim=8, seed=3)
    second = FastTextClassifier.train(examples, bucket=2**10, dim=8, seed=3)
    other = FastTextClassifier.train(examples, bucket=2**10, dim=8, seed=4)
    np.testing.assert_array_equal(first.input_matrix, second.input_matrix)
    texts = [text for text, _ in _order_examples(20, seed=9)]
    np.testing.assert_array_equal(first.predict_proba(texts), second.predict_proba(texts))
    assert not np.array_equal(first.predict_proba(texts), other.predict_proba(texts))


def test_save_load_round_trip_gives_identical_probabilities(
    small_model: FastTextClassifier,
    quality_data: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """A saved and reloaded model predicts bit-identically and leaves no temporary files."""
    path = tmp_path / "quality.npz"
    small_model.save(path)
    loaded = FastTextClassifier.load(path)
    texts = [text for text, _ in quality_data[1]] + ["café 東京 unseen words"]
    np.testing.assert_array_equal(loaded.predict_proba(texts), small_model.predict_proba(texts))
    assert loaded.words == small_model.words and loaded.labels == small_model.labels
    assert [p.name for p in tmp_path.iterdir()] == ["quality.npz"]


def test_foreign_or_tampered_files_are_refused(
    small_model: FastTextClassifier, tmp_path: Path
) -> None:
    """A non-npz file, an npz of something else, another version or a damaged model is refused."""
    not_npz = tmp_path / "not.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="not a readable FastTextClassifier"):
        FastTextClassifier.load(not_npz)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(ValueError, match="is not a FastTextClassifier file"):
        FastTextClassifier.load(foreign)
    good = tmp_path / "good.npz"
    small_model.save(good)
    with np.load(good) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez(tmp_path / "v2.npz", **{**arrays, "version": np.array(2)})
    with pytest.raises(ValueError, match="format version 2; this code reads version 1"):
        FastTextClassifier.load(tmp_path / "v2.npz")
    np.savez(tmp_path / "cut.npz", **{**arrays, "input_matrix": arrays["input_matrix"][:-1]})
    with pytest.raises(ValueError, match=r"damaged FastTextClassifier file.*input_matrix"):
        FastTextClassifier.load(tmp_path / "cut.npz")
    pickled = {**arrays, "labels": np.array([HQ, LQ], dtype=object)}
    np.savez(tmp_path / "objects.npz", **pickled)
    with pytest.raises(ValueError, match="not a readable FastTextClassifier"):
        FastTextClassifier.load(tmp_path / "objects.npz")


def test_quality_filter_keeps_and_drops_by_threshold(small_model: FastTextClassifier) -> None:
    """The filter records metadata["quality_score"] and drops low scores as "low_quality_score"."""
    docs = [
        Document(id="ref", text=inspect.getdoc(json.dumps) or ""),
        Document(id="spam", text="click here buy now cheap best price free shipping win casino"),
    ]
    stats = StepStats()
    kept = list(QualityFilter(small_model, label=HQ, threshold=0.5).run(docs, stats))
    assert [doc.id for doc in kept] == ["ref"]
    assert stats.kept == 1 and stats.dropped == {"low_quality_score": 1}
    assert docs[0].metadata["quality_score"] > 0.5 > docs[1].metadata["quality_score"]
    assert len(list(QualityFilter(small_model, threshold=0.0).run(docs, StepStats()))) == 2


def test_quality_filter_survives_pickle(small_model: FastTextClassifier) -> None:
    """A pickled filter (as sent to pipeline workers) scores documents exactly as the original."""
    step = QualityFilter(small_model, threshold=0.7)
    clone = pickle.loads(pickle.dumps(step))
    text = inspect.getdoc(random.shuffle) or ""
    assert clone.score(text) == step.score(text) and clone.threshold == 0.7


def test_lowercase_option_folds_case() -> None:
    """With lowercase=True, upper- and lower-case text get the same probabilities."""
    model = FastTextClassifier.train(_order_examples(100, 0), bucket=2**8, dim=8, lowercase=True)
    np.testing.assert_array_equal(
        model.predict_proba(["w1 NOT Good w2"]), model.predict_proba(["w1 not good w2"])
    )


def test_predict_returns_k_labels_by_falling_probability(small_model: FastTextClassifier) -> None:
    """predict gives k (label, probability) pairs, most likely first, summing to 1 over all labels."""
    top = small_model.predict("Return a new sorted list from the items in iterable.", k=5)
    assert [label for label, _ in top] == [HQ, LQ]
    assert top[0][1] >= top[1][1] and sum(p for _, p in top) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("examples", "kwargs", "message"),
    [
        ([], {}, "training set is empty"),
        ([("a b", "x"), ("c d", "x")], {}, "single label 'x'"),
        ([("a", "x"), ("b", "y")], {"dim": 0}, "dim must be >= 1, got 0"),
        ([("a", "x"), ("b", "y")], {"lr": -1.0}, "lr must be > 0, got -1.0"),
        ([("a", "x"), ("b", "y")], {"bucket": 0}, "bucket must be >= 1 .* got 0"),
        ([("a", "x"), ("b", "y")], {"min_count": 5}, "min_count=5 leaves no words"),
    ],
)
def test_bad_training_inputs_are_named(
    examples: list[tuple[str, str]], kwargs: dict[str, float], message: str
) -> None:
    """Training errors name the offending value."""
    with pytest.raises(ValueError, match=message):
        FastTextClassifier.train(examples, **kwargs)  # type: ignore[arg-type]


def test_bad_prediction_and_filter_inputs_are_named(small_model: FastTextClassifier) -> None:
    """k < 1, a bare string to predict_proba, an unknown label and a bad threshold are refused."""
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        small_model.predict("text", k=0)
    with pytest.raises(TypeError, match="iterable of texts"):
        small_model.predict_proba("text")
    with pytest.raises(ValueError, match=r"label 'hq' is not one of .*__label__hq"):
        QualityFilter(small_model, label="hq")
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1\.5"):
        QualityFilter(small_model, threshold=1.5)


def test_quality_module_does_not_import_torch() -> None:
    """Importing llama_data.quality pulls in no torch (llama-data runs on CPU fleets)."""
    check = "import sys, llama_data.quality; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", check], check=True)
