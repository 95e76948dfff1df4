"""MinHasher and LshIndex against datasketch, the reference implementation."""

from __future__ import annotations

import datasketch
import numpy as np
import pytest
import xxhash
from datasketch.lsh import _optimal_param

from llama_data.minhash import LshIndex, MinHasher, estimated_jaccard, optimal_bands_rows


def _random_shingles(rng: np.random.Generator, count: int) -> list[bytes]:
    return [rng.bytes(int(rng.integers(1, 40))) for _ in range(count)]


@pytest.mark.parametrize("scheme", ["affine32", "affine64", "legacy"])
@pytest.mark.parametrize(("seed", "num_perm"), [(1, 128), (7, 16), (12345, 256)])
def test_signature_equals_datasketch_update(scheme: str, seed: int, num_perm: int) -> None:
    """Signatures equal datasketch.MinHash.hashvalues (values and dtype) for the same shingles."""
    rng = np.random.default_rng(seed)
    hasher = MinHasher(num_perm=num_perm, seed=seed, scheme=scheme)  # type: ignore[arg-type]
    for count in (1, 5, 300):
        shingles = _random_shingles(rng, count)
        reference = datasketch.MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
        for shingle in shingles:
            reference.update(shingle)
        ours = hasher.signature_from_shingles(shingles)
        assert ours.dtype == reference.hashvalues.dtype
        np.testing.assert_array_equal(ours, reference.hashvalues)


@pytest.mark.parametrize("scheme", ["affine32", "affine64", "legacy"])
def test_xxh3_signature_equals_datasketch_with_same_hashfunc(scheme: str) -> None:
    """The xxh3 shingle hash matches datasketch given the equivalent hashfunc."""
    mask = (1 << 64) - 1 if scheme == "affine64" else (1 << 32) - 1
    shingles = _random_shingles(np.random.default_rng(3), 200)
    reference = datasketch.MinHash(
        num_perm=64,
        seed=3,
        scheme=scheme,
        hashfunc=lambda s: xxhash.xxh3_64_intdigest(s) & mask,
    )
    reference.update_batch(shingles)
    hasher = MinHasher(num_perm=64, seed=3, scheme=scheme, shingle_hash="xxh3")  # type: ignore[arg-type]
    np.testing.assert_array_equal(hasher.signature_from_shingles(shingles), reference.hashvalues)


def test_empty_document_has_datasketch_initial_signature() -> None:
    """A text without words has the signature of a never-updated datasketch MinHash."""
    hasher = MinHasher()
    np.testing.assert_array_equal(hasher.signature("  ... !! "), datasketch.MinHash().hashvalues)


def test_batched_signatures_equal_one_at_a_time() -> None:
    """signatures() over a batch (empty, short, long documents) equals signature() per text."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    texts = ["", "two words", *(" ".join(rng.choice(words, n)) for n in (4, 5, 6, 50, 3000, 9000))]
    hasher = MinHasher(num_perm=32)
    batched = hasher.signatures(texts)
    assert batched.shape == (len(texts), 32)
    for row, text in zip(batched, texts, strict=True):
        np.testing.assert_array_equal(row, hasher.signature(text))


def test_shingles_are_lowercased_word_ngrams() -> None:
    """Shingles are lower-cased words (split at punctuation and spaces), ngram at a time."""
    hasher = MinHasher(ngram=3)
    assert hasher.shingles("The cat, sat ON the-mat.") == [
        b"the cat sat",
        b"cat sat on",
        b"sat on the",
        b"on the mat",
    ]
    assert hasher.shingles("Hi there") == [b"hi there"]
    assert hasher.shingles("Café, naïve—déjà_vu") == [
        "café naïve déjà".encode(),
        "naïve déjà vu".encode(),
    ]
    assert hasher.shingles("") == []


def test_estimated_jaccard_tracks_exact_jaccard() -> None:
    """The signature agreement estimates the exact Jaccard within 4 standard errors."""
    a = {f"s{i}".encode() for i in range(1000)}
    b = {f"s{i}".encode() for i in range(300, 1300)}
    exact = len(a & b) / len(a | b)  # 700 / 1300
    hasher = MinHasher(num_perm=256)
    estimate = estimated_jaccard(
        hasher.signature_from_shingles(sorted(a)), hasher.signature_from_shingles(sorted(b))
    )
    assert abs(estimate - exact) < 4 * np.sqrt(exact * (1 - exact) / 256), (estimate, exact)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_optimal_bands_rows_equals_datasketch(threshold: float, num_perm: int) -> None:
    """Our bands x rows search picks datasketch's optimum (scipy quad there, Simpson here)."""
    assert optimal_bands_rows(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_lsh_index_validates_explicit_bands_rows() -> None:
    """Explicit bands x rows above num_perm, or only one of them, is refused with the fix."""
    assert (LshIndex(0.8, 128, bands=16, rows=8).bands, LshIndex(0.8, 128).rows) == (16, 13)
    with pytest.raises(ValueError, match="bands \\* rows <= num_perm"):
        LshIndex(0.8, 128, bands=16, rows=9)
    with pytest.raises(ValueError, match="both bands and rows"):
        LshIndex(0.8, 128, bands=16)


def test_lsh_buckets_group_identical_bands() -> None:
    """Documents are candidates exactly when some band of their signatures is identical."""
    sigs = np.array(
        [[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]], dtype=np.uint32
    )
    index = LshIndex(0.5, 4, bands=2, rows=2)
    buckets = sorted(members.tolist() for members in index.buckets(sigs))
    assert buckets == [[0, 1, 4], [0, 2, 4]]
    assert index.candidate_pairs(sigs) == {(0, 1), (0, 4), (1, 4), (0, 2), (2, 4)}
