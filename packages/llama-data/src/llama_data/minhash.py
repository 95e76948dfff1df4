"""MinHash signatures and LSH banding for document-level near-duplicate detection (§3.1.1).

The Llama 3 paper removes near-duplicate documents with MinHash (Broder, 1997). This module holds
the two numeric pieces; the pipeline step that uses them is `llama_data.dedup.NearDedup`.

`MinHasher` turns a text into a MinHash signature. Signatures are bit-for-bit compatible with
`datasketch.MinHash` (the reference implementation; a test checks it): given the same shingles,
`num_perm`, `seed` and permutation scheme, `MinHasher.signature_from_shingles(shingles)` equals
`datasketch.MinHash(num_perm, seed, scheme=...)` updated with each shingle. What we add is speed:
every shingle of a document (and of a batch of documents) is hashed into one numpy array and all
`num_perm` permutations are applied as one array operation, instead of one numpy call per shingle.

The permutation schemes are datasketch's (read from its source, datasketch 2.0):

- ``"affine32"`` (datasketch's default since 2.0, ours too): the 32-bit shingle hash is pre-mixed
  with the MurmurHash3 32-bit finalizer, then permuted as ``a * h + b mod 2**32`` with ``a`` odd
  (a bijection); ``a``, ``b`` drawn from ``numpy.random.RandomState(seed)``. Values are uint32.
- ``"affine64"``: the same over 64-bit hashes (the first 8 bytes of sha1) and the 64-bit finalizer.
- ``"legacy"`` (datasketch before 2.0): ``(a * h + b) mod (2**61 - 1)`` computed in wrapping
  uint64 arithmetic, masked to 32 bits; values are uint64.

Shingle hash: sha1 of the shingle's UTF-8 bytes, first 4 (or 8) bytes read little-endian, as
datasketch's default `sha1_hash32`/`sha1_hash64`. ``shingle_hash="xxh3"`` is ~8x faster to hash;
its datasketch equivalent is ``hashfunc=lambda s: xxhash.xxh3_64_intdigest(s) & 0xFFFFFFFF``
(without the mask for affine64).

Tokenisation: the text is lower-cased, every punctuation, symbol, separator and control character
(Unicode categories P*, S*, Z*, Cc, Cf) becomes a space, and the words are what `str.split` then
returns: runs of letters, marks and digits (3x faster than ``re.findall(r"\\w+")``, and it keeps
combining accents inside their word). A shingle is ``ngram`` consecutive words joined by one space;
a document with fewer than ``ngram`` words (but at least one) is one shingle.

`LshIndex` splits each signature into ``bands`` bands of ``rows`` values; two documents are
candidates when any band is identical (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*,
ch. 3). Bands and rows default to datasketch's optimal choice for a Jaccard threshold: the pair
minimising the equally weighted false-positive and false-negative areas under the S-curve.
"""

from __future__ import annotations

import hashlib
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import xxhash

__all__ = ["LshIndex", "MinHasher", "estimated_jaccard", "optimal_bands_rows"]

Scheme = Literal["affine32", "affine64", "legacy"]
ShingleHash = Literal["sha1", "xxh3"]
Signature = npt.NDArray[np.unsignedinteger[Any]]  # uint32 (affine32) or uint64; [..., num_perm]
Hashes = npt.NDArray[np.unsignedinteger[Any]]  # one hash per shingle, the scheme's dtype

_MERSENNE_PRIME = (1 << 61) - 1  # datasketch's legacy permutation modulus
_MAX_HASH_32 = (1 << 32) - 1
# MurmurHash3 finalizer constants (shift, multiplier, shift, multiplier, shift), as in datasketch 2.0.
_FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)
_FMIX64 = (33, 0xFF51AFD7ED558CCD, 33, 0xC4CEB9FE1A85EC53, 33)
_ROWS_PER_CHUNK = 8192  # shingles permuted at once: num_perm x 8192 values (4 MiB at 128 perms)


@lru_cache(maxsize=1)
def _separators() -> dict[int, int]:
    """A `str.translate` table sending every non-word character (module docstring) to a space."""
    table = {}
    for codepoint in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(codepoint))
        if category[0] in "PSZ" or category in ("Cc", "Cf"):
            table[codepoint] = 0x20
    return table


def _fmix(hv: Hashes, width: int) -> Hashes:
    """MurmurHash3's finalizer, a bijection on [0, 2**width); array arithmetic wraps."""
    dtype = np.uint32 if width == 32 else np.uint64
    s1, m1, s2, m2, s3 = (dtype(c) for c in (_FMIX32 if width == 32 else _FMIX64))
    hv = hv ^ (hv >> s1)
    hv = hv * m1
    hv = hv ^ (hv >> s2)
    hv = hv * m2
    return hv ^ (hv >> s3)


class MinHasher:
    """Computes datasketch-compatible MinHash signatures of documents, vectorised with numpy."""

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        scheme: Scheme = "affine32",
        shingle_hash: ShingleHash = "sha1",
    ) -> None:
        """`num_perm` permutations of word `ngram` shingles, permutations drawn from `seed`.

        `scheme` and the default sha1 `shingle_hash` match datasketch (module docstring).
        """
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1 (words per shingle), got {ngram}")
        if scheme not in ("affine32", "affine64", "legacy"):
            raise ValueError(f"scheme must be 'affine32', 'affine64' or 'legacy', got {scheme!r}")
        if shingle_hash not in ("sha1", "xxh3"):
            raise ValueError(f"shingle_hash must be 'sha1' or 'xxh3', got {shingle_hash!r}")
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        self.scheme: Scheme = scheme
        self.shingle_hash: ShingleHash = shingle_hash
        self._width = 64 if scheme == "affine64" else 32
        self.dtype: type[np.unsignedinteger] = np.uint32 if scheme == "affine32" else np.uint64
        self.a, self.b = self._permutations()
        max_value = (1 << 64) - 1 if scheme == "affine64" else _MAX_HASH_32
        self.empty_signature: Signature = np.full(num_perm, max_value, dtype=self.dtype)

    def _permutations(self) -> tuple[Hashes, Hashes]:
        """The `a`, `b` parameters, drawn from RandomState(seed) exactly as datasketch draws them."""
        gen = np.random.RandomState(self.seed)
        if self.scheme == "legacy":
            pairs = [
                (
                    gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64),
                    gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64),
                )
                for _ in range(self.num_perm)
            ]
            params = np.array(pairs, dtype=np.uint64).T  # [2, num_perm]
            return params[0].copy(), params[1].copy()
        w = self._width
        dtype = self.dtype
        a = gen.randint(0, 1 << (w - 1), self.num_perm, dtype=dtype) * dtype(2) + dtype(1)
        b = gen.randint(0, 1 << w, self.num_perm, dtype=dtype)
        return a, b

    def shingles(self, text: str) -> list[bytes]:
        """The word `ngram` shingles of `text` as UTF-8 bytes (tokenisation: module docstring)."""
        # Every whitespace character is a separator, hence a space after translate(): splitting the
        # UTF-8 bytes at ASCII whitespace equals str.split(), and joins bytes without re-encoding.
        words = text.lower().translate(_separators()).encode().split()
        n = self.ngram
        if len(words) <= n:
            return [b" ".join(words)] if words else []
        return list(map(b" ".join, zip(*(words[i:] for i in range(n)), strict=False)))

    def hash_shingles(self, shingles: Sequence[bytes]) -> Hashes:
        """The 32-bit (64-bit for affine64) hash of each shingle, in the scheme's dtype."""
        count = len(shingles)
        if self.shingle_hash == "xxh3":
            hv = np.fromiter(map(xxhash.xxh3_64_intdigest, shingles), np.uint64, count)
            if self._width == 32:
                hv = hv.astype(np.uint32)  # the low 32 bits
            return hv.astype(self.dtype)
        sha1 = hashlib.sha1
        digests = b"".join([sha1(s).digest() for s in shingles])  # 20 bytes each
        little_endian = "<u8" if self._width == 64 else "<u4"
        first_bytes = np.ndarray((count,), little_endian, digests, strides=(20,))
        return first_bytes.astype(self.dtype)

    def _permute(self, hv: Hashes) -> Hashes:
        """Every permutation applied to every hash: [num_perm, len(hv)]."""
        if self.scheme == "legacy":
            phv = np.multiply.outer(
                self.a, hv.astype(np.uint64)
            )  # wraps mod 2**64, like datasketch
            phv += self.b[:, None]
            # x mod p for p = 2**61 - 1 and any uint64 x, without a division: y = (x & p) + (x >> 61)
            # is congruent to x and below 2p. Where y >= p the result is y - p, whose low 32 bits
            # are those of y + 1 (p = 2**61 - 1 and 2**61 is 0 mod 2**32).
            prime = np.uint64(_MERSENNE_PRIME)
            high = phv >> np.uint64(61)
            phv &= prime
            phv += high
            phv += phv >= prime
            phv &= np.uint64(_MAX_HASH_32)
            return phv
        phv = np.multiply.outer(self.a, _fmix(hv, self._width))
        phv += self.b[:, None]
        return phv

    def signature_from_hashes(self, hv: Hashes) -> Signature:
        """The signature [num_perm] of one document given its shingle hashes."""
        sig = self.empty_signature.copy()
        for start in range(0, len(hv), _ROWS_PER_CHUNK):
            np.minimum(sig, self._permute(hv[start : start + _ROWS_PER_CHUNK]).min(axis=1), out=sig)
        return sig

    def signature_from_shingles(self, shingles: Sequence[bytes]) -> Signature:
        """The signature [num_perm] of one set of shingles (equal to datasketch's)."""
        return self.signature_from_hashes(self.hash_shingles(shingles))

    def signature(self, text: str) -> Signature:
        """The signature [num_perm] of one text."""
        return self.signature_from_shingles(self.shingles(text))

    def signatures(self, texts: Iterable[str]) -> Signature:
        """Signatures of many texts [n_texts, num_perm], small documents permuted in batches."""
        hashes = [self.hash_shingles(self.shingles(text)) for text in texts]
        out = np.tile(self.empty_signature, (len(hashes), 1))  # no shingles: the all-max signature
        batch: list[int] = []
        rows = 0
        for i, hv in enumerate(hashes):
            if len(hv) >= _ROWS_PER_CHUNK:
                out[i] = self.signature_from_hashes(hv)
                continue
            if len(hv) == 0:
                continue
            if rows + len(hv) > _ROWS_PER_CHUNK:
                self._batch_signatures(hashes, batch, out)
                batch, rows = [], 0
            batch.append(i)
            rows += len(hv)
        self._batch_signatures(hashes, batch, out)
        return out

    def _batch_signatures(
        self,
        hashes: list[Hashes],
        batch: list[int],
        out: Signature,
    ) -> None:
        """Fill out[batch] with one permutation call over the concatenated, non-empty hashes."""
        if not batch:
            return
        lengths = np.array([len(hashes[i]) for i in batch])
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        phv = self._permute(np.concatenate([hashes[i] for i in batch]))  # [num_perm, total]
        out[batch] = np.minimum.reduceat(phv, starts, axis=1).T  # [len(batch), num_perm]


def estimated_jaccard(sig_a: Signature, sig_b: Signature) -> float:
    """The MinHash estimate of the Jaccard similarity: the fraction of equal signature values."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures differ in shape: {sig_a.shape} vs {sig_b.shape}")
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.shape[-1]


@lru_cache(maxsize=64)
def optimal_bands_rows(
    threshold: float,
    num_perm: int,
    false_positive_weight: float = 0.5,
    false_negative_weight: float = 0.5,
) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative areas, like datasketch.

    A pair of Jaccard s is a candidate with probability P(s) = 1 - (1 - s**rows)**bands. The
    false-positive area is the integral of P over [0, threshold], the false-negative area that of
    1 - P over [threshold, 1]; both are integrated with Simpson's rule (datasketch uses scipy quad).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    bands = pairs[:, 0:1].astype(np.float64)
    rows = pairs[:, 1:2].astype(np.float64)

    def area(lo: float, hi: float, false_negative: bool) -> npt.NDArray[np.float64]:
        s = np.linspace(lo, hi, 2001)  # odd number of points for Simpson's rule
        p = 1.0 - (1.0 - s[None, :] ** rows) ** bands  # [pairs, points]
        f = 1.0 - p if false_negative else p
        weights = np.ones(s.size)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return (f @ weights) * (hi - lo) / (3.0 * (s.size - 1))

    error = false_positive_weight * area(0.0, threshold, False)
    error += false_negative_weight * area(threshold, 1.0, True)
    b, r = pairs[int(np.argmin(error))]
    return int(b), int(r)


class LshIndex:
    """Locality-sensitive hashing by banding: documents sharing any identical band are candidates."""

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        *,
        bands: int | None = None,
        rows: int | None = None,
        false_positive_weight: float = 0.5,
        false_negative_weight: float = 0.5,
    ) -> None:
        """Bands and rows for Jaccard `threshold`, or explicit `bands` x `rows` <= `num_perm`.

        Without explicit bands and rows, `optimal_bands_rows` picks them with the two weights
        (datasketch's defaults: 0.5 each). Raise `false_negative_weight` when candidates are
        verified afterwards (as `NearDedup` does): false positives then cost only a comparison.
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if (bands is None) != (rows is None):
            raise ValueError(f"give both bands and rows or neither, got {bands=} and {rows=}")
        if bands is None or rows is None:
            bands, rows = optimal_bands_rows(
                threshold, num_perm, false_positive_weight, false_negative_weight
            )
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ValueError(
                f"need bands >= 1, rows >= 1 and bands * rows <= num_perm; got {bands=}, {rows=}, "
                f"{num_perm=}: lower bands or rows, or raise num_perm"
            )
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands = bands
        self.rows = rows

    def buckets(self, signatures: Signature) -> Iterator[npt.NDArray[np.intp]]:
        """For each band, the groups (ascending row indices, size >= 2) with an identical band."""
        if signatures.ndim != 2 or signatures.shape[1] != self.num_perm:
            raise ValueError(
                f"signatures must be [n_docs, {self.num_perm}], got shape {signatures.shape}"
            )
        for band in range(self.bands):
            part = np.ascontiguousarray(signatures[:, band * self.rows : (band + 1) * self.rows])
            keys = part.view(np.dtype((np.void, part.shape[1] * part.itemsize))).ravel()  # [n_docs]
            _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            order = np.argsort(inverse, kind="stable")  # documents grouped by bucket, ascending
            ends = np.cumsum(counts)
            for bucket in np.flatnonzero(counts >= 2):
                yield order[ends[bucket] - counts[bucket] : ends[bucket]]

    def candidate_pairs(self, signatures: Signature) -> set[tuple[int, int]]:
        """All pairs (i < j) sharing a band; quadratic in bucket size, meant for evaluation."""
        pairs: set[tuple[int, int]] = set()
        for members in self.buckets(signatures):
            ids = members.tolist()
            pairs.update((ids[x], ids[y]) for x in range(len(ids)) for y in range(x + 1, len(ids)))
        return pairs
