"""Tests for llama_data.shards: the token shard layout, its reader, and atomic writes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from llama_data.document import Document
from llama_data.shards import FORMAT_NAME, UNKNOWN_TOKENIZER, Manifest, write_token_shards
from llama_data.token_shards import TokenShards

BOS, EOS = 1, 2


class ByteTokenizer:
    """Plain shape: encode(text) -> ids; one id per UTF-8 byte, offset past the specials."""

    vocab_size = 259
    bos_id = BOS
    eos_id = EOS
    name = "bytes"
    sha256 = "0" * 64

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class SpecialByteTokenizer:
    """llama_model shape: encode(text, *, bos, eos) adds the specials itself (no bos_id attr)."""

    vocab_size = 259
    name = "bytes"
    sha256 = "0" * 64

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [BOS] * bos + ByteTokenizer().encode(text) + [EOS] * eos


def _expected(text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
    """Oracle: the byte tokenization written out by hand."""
    return [BOS] * bos + [b + 3 for b in text.encode("utf-8")] + [EOS] * eos


def _docs(texts: list[str], source: str = "web") -> list[Document]:
    return [Document(id=f"d{i}", text=t, source=source) for i, t in enumerate(texts)]


TEXTS = ["hello", "a", "wörld!", "longer document text", "xy"]


def test_round_trip_every_document(tmp_path: Path) -> None:
    """Every document reads back as BOS + the tokenizer's ids + EOS, in order."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds")
    shards = TokenShards(tmp_path / "ds")
    assert len(shards) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        assert shards.document(i).tolist() == _expected(text)
    assert [doc.tolist() for doc in shards] == [_expected(t) for t in TEXTS]
    assert shards.num_tokens == sum(len(_expected(t)) for t in TEXTS)


def test_special_token_tokenizer_shape(tmp_path: Path) -> None:
    """A tokenizer with encode(text, *, bos, eos) adds BOS/EOS itself and gives the same shards."""
    write_token_shards(_docs(TEXTS), SpecialByteTokenizer(), tmp_path / "ds")
    assert [d.tolist() for d in TokenShards(tmp_path / "ds")] == [_expected(t) for t in TEXTS]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), SpecialByteTokenizer()])
@pytest.mark.parametrize(("bos", "eos"), [(False, False), (True, False), (False, True)])
def test_bos_eos_flags(tmp_path: Path, tokenizer: object, bos: bool, eos: bool) -> None:
    """add_bos/add_eos put BOS first and EOS last only when asked, for both tokenizer shapes."""
    write_token_shards(_docs(["ab"]), tokenizer, tmp_path / "ds", add_bos=bos, add_eos=eos)  # type: ignore[arg-type]
    assert TokenShards(tmp_path / "ds").document(0).tolist() == _expected("ab", bos=bos, eos=eos)


def test_plain_tokenizer_that_adds_bos_is_not_doubled(tmp_path: Path) -> None:
    """A plain encode() that already starts with bos_id (as HF tokenizers do) gets no second BOS."""

    class AddsBos(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            return [BOS, *super().encode(text)]

    write_token_shards(_docs(["ab"]), AddsBos(), tmp_path / "ds")
    assert TokenShards(tmp_path / "ds").document(0).tolist() == _expected("ab")


def test_offsets_and_little_endian_bytes(tmp_path: Path) -> None:
    """The .bin holds little-endian uint32 tokens; the .idx.npy holds int64 start offsets + end."""
    write_token_shards(_docs(["ab", "c"]), ByteTokenizer(), tmp_path / "ds")
    tokens = np.fromfile(tmp_path / "ds" / "shard-00000.bin", dtype="<u4")
    assert tokens.tolist() == _expected("ab") + _expected("c")
    assert (tmp_path / "ds" / "shard-00000.bin").read_bytes()[:8] == bytes(
        [1, 0, 0, 0, 100, 0, 0, 0]
    )
    offsets = np.load(tmp_path / "ds" / "shard-00000.idx.npy")
    assert offsets.dtype == np.dtype("<i8") and offsets.tolist() == [0, 4, 7]


def test_shard_boundaries_never_split_documents(tmp_path: Path) -> None:
    """With a small shard_tokens, shards fill up to the limit and no document spans two."""
    # Token lengths (with BOS/EOS): 4, 4, 4, 3, 5 → shards of at most 8 tokens: [4,4] [4,3] [5].
    texts = ["ab", "cd", "ef", "g", "hij"]
    manifest = write_token_shards(_docs(texts), ByteTokenizer(), tmp_path / "ds", shard_tokens=8)
    assert [(s.num_documents, s.num_tokens) for s in manifest.shards] == [(2, 8), (2, 7), (1, 5)]
    shards = TokenShards(tmp_path / "ds")
    assert shards.num_shards == 3
    assert shards.shard(1).tolist() == _expected("ef") + _expected("g")
    assert shards.shard_offsets(1).tolist() == [0, 4, 7]
    assert [shards.document(i).tolist() for i in range(5)] == [_expected(t) for t in texts]


def test_document_longer_than_shard_gets_its_own_shard(tmp_path: Path) -> None:
    """A document longer than shard_tokens is written whole, alone in its shard."""
    texts = ["a", "x" * 20, "b"]
    manifest = write_token_shards(_docs(texts), ByteTokenizer(), tmp_path / "ds", shard_tokens=5)
    assert [(s.num_documents, s.num_tokens) for s in manifest.shards] == [(1, 3), (1, 22), (1, 3)]
    assert TokenShards(tmp_path / "ds").document(1).tolist() == _expected("x" * 20)


def test_manifest_contents(tmp_path: Path) -> None:
    """manifest.json records format, version, tokenizer identity, counts, shards and the mixture."""
    docs = _docs(["ab", "c"], source="web") + _docs(["def"], source="code")
    manifest = write_token_shards(
        docs, ByteTokenizer(), tmp_path / "ds", mixture={"web": 0.7, "code": 0.2, "math": 0.1}
    )
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk["format"] == FORMAT_NAME and on_disk["format_version"] == 1
    assert on_disk["tokenizer"] == {"name": "bytes", "sha256": "0" * 64, "vocab_size": 259}
    assert on_disk["num_tokens"] == 4 + 3 + 5 and on_disk["num_documents"] == 3
    assert on_disk["mixture"] == {
        "code": {"documents": 1, "tokens": 5, "weight": 0.2},
        "math": {"documents": 0, "tokens": 0, "weight": 0.1},
        "web": {"documents": 2, "tokens": 7, "weight": 0.7},
    }
    assert on_disk["shards"][0]["file"] == "shard-00000.bin"
    assert on_disk["shards"][0]["index"] == "shard-00000.idx.npy"
    assert Manifest.model_validate(on_disk) == manifest == TokenShards(tmp_path / "ds").manifest


class AnonymousTokenizer:
    """A plain tokenizer with no name or sha256 attribute."""

    vocab_size, bos_id, eos_id = 259, BOS, EOS

    def encode(self, text: str) -> list[int]:
        return ByteTokenizer().encode(text)


SPEC_SHA256 = hashlib.sha256(b"utf-8 bytes + 3, bos 1, eos 2").hexdigest()


def test_tokenizer_without_identity_is_an_error(tmp_path: Path) -> None:
    """No name/sha256 attributes and no arguments: an error naming both arguments, nothing written."""
    with pytest.raises(ValueError, match=r"AnonymousTokenizer.*tokenizer_name=.*tokenizer_sha256="):
        write_token_shards(_docs(["a"]), AnonymousTokenizer(), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_with_a_name_but_no_sha256_is_an_error(tmp_path: Path) -> None:
    """A name alone is not an identity: the error asks for tokenizer_sha256 only."""

    class NamedOnly(AnonymousTokenizer):
        name = "bytes"

    with pytest.raises(ValueError, match="pass tokenizer_sha256=") as info:
        write_token_shards(_docs(["a"]), NamedOnly(), tmp_path / "ds")
    assert "tokenizer_name" not in str(info.value)


def test_explicit_tokenizer_identity_is_recorded(tmp_path: Path) -> None:
    """tokenizer_name/tokenizer_sha256 are written to the manifest and read back by TokenShards."""
    manifest = write_token_shards(
        _docs(["a"]),
        AnonymousTokenizer(),
        tmp_path / "ds",
        tokenizer_name="bytes+3",
        tokenizer_sha256=SPEC_SHA256.upper(),
    )
    assert (manifest.tokenizer.name, manifest.tokenizer.sha256) == ("bytes+3", SPEC_SHA256)
    shards = TokenShards(tmp_path / "ds")
    assert shards.tokenizer == shards.manifest.tokenizer == manifest.tokenizer


def test_tokenizer_attributes_are_recorded(tmp_path: Path) -> None:
    """Without arguments, the tokenizer's own name and sha256 attributes are recorded."""
    manifest = write_token_shards(_docs(["a"]), SpecialByteTokenizer(), tmp_path / "ds")
    assert (manifest.tokenizer.name, manifest.tokenizer.sha256) == ("bytes", "0" * 64)


@pytest.mark.parametrize(
    ("tokenizer", "arguments", "message"),
    [
        (ByteTokenizer(), {"tokenizer_sha256": "1" * 64}, "contradicts ByteTokenizer.sha256"),
        (
            AnonymousTokenizer(),
            {"tokenizer_name": "bytes+3", "tokenizer_sha256": "not-a-hash"},
            "'not-a-hash' is not 64 hexadecimal digits",
        ),
        (
            AnonymousTokenizer(),
            {"tokenizer_name": "unknown", "tokenizer_sha256": SPEC_SHA256},
            "give the tokenizer's real name",
        ),
    ],
    ids=["contradicting", "malformed", "unknown-name"],
)
def test_bad_tokenizer_identity_is_an_error(
    tmp_path: Path, tokenizer: object, arguments: dict[str, str], message: str
) -> None:
    """A sha256 contradicting the tokenizer's, a malformed sha256 or the name "unknown" is refused."""
    with pytest.raises(ValueError, match=message):
        write_token_shards(_docs(["a"]), tokenizer, tmp_path / "ds", **arguments)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_old_manifest_with_unknown_tokenizer_still_reads(tmp_path: Path) -> None:
    """A manifest written before identity was required ("unknown") opens, and says "unknown"."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds")
    _rewrite_manifest(
        tmp_path / "ds", tokenizer={"name": "unknown", "sha256": "unknown", "vocab_size": 259}
    )
    shards = TokenShards(tmp_path / "ds")
    assert shards.tokenizer.sha256 == UNKNOWN_TOKENIZER and shards.tokenizer.name == "unknown"
    assert [d.tolist() for d in shards] == [_expected(t) for t in TEXTS]


def test_shard_checksums_verify(tmp_path: Path) -> None:
    """verify() passes on a fresh dataset and names the file after a byte is flipped."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds")
    TokenShards(tmp_path / "ds").verify()
    token_file = tmp_path / "ds" / "shard-00000.bin"
    data = bytearray(token_file.read_bytes())
    data[0] ^= 0xFF
    token_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00000\.bin"):
        TokenShards(tmp_path / "ds").verify()


def test_empty_dataset(tmp_path: Path) -> None:
    """No documents gives a valid dataset with no shards."""
    manifest = write_token_shards([], ByteTokenizer(), tmp_path / "ds")
    shards = TokenShards(tmp_path / "ds")
    assert manifest.shards == () and len(shards) == 0 and list(shards) == []


def test_zero_token_document(tmp_path: Path) -> None:
    """An empty document without BOS/EOS is kept as a zero-length document (and shard)."""
    write_token_shards(_docs([""]), ByteTokenizer(), tmp_path / "ds", add_bos=False, add_eos=False)
    shards = TokenShards(tmp_path / "ds")
    assert len(shards) == 1 and shards.document(0).tolist() == [] and shards.num_tokens == 0


def test_document_index_errors_and_negative_indices(tmp_path: Path) -> None:
    """document(-1) is the last document; an out-of-range index raises naming it."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds", shard_tokens=8)
    shards = TokenShards(tmp_path / "ds")
    assert shards.document(-1).tolist() == _expected(TEXTS[-1])
    with pytest.raises(IndexError, match="5"):
        shards.document(5)


# --------------------------------------------------------------------------------------------
# Tokenizer and argument errors


def test_missing_vocab_size_is_an_error(tmp_path: Path) -> None:
    """A tokenizer without vocab_size is refused with a message naming the attribute."""

    class NoVocab:
        def encode(self, text: str) -> list[int]:
            return [3]

    with pytest.raises(ValueError, match="vocab_size"):
        write_token_shards(_docs(["a"]), NoVocab(), tmp_path / "ds", add_bos=False, add_eos=False)  # type: ignore[arg-type]
    assert not (tmp_path / "ds").exists()


def test_vocab_size_over_uint32_is_an_error(tmp_path: Path) -> None:
    """A vocab_size above 2**32 cannot be stored as uint32 and is refused, naming the value."""

    class Huge(ByteTokenizer):
        vocab_size = 2**32 + 1

    with pytest.raises(ValueError, match=str(2**32 + 1)):
        write_token_shards(_docs(["a"]), Huge(), tmp_path / "ds")


def test_missing_bos_id_is_an_error(tmp_path: Path) -> None:
    """add_bos with a plain tokenizer lacking bos_id says to add it or pass add_bos=False."""

    class NoSpecials:
        vocab_size = 259

        def encode(self, text: str) -> list[int]:
            return [3]

    with pytest.raises(ValueError, match=r"bos_id.*add_bos=False"):
        write_token_shards(_docs(["a"]), NoSpecials(), tmp_path / "ds")


def test_token_id_outside_vocab_is_an_error(tmp_path: Path) -> None:
    """A token id >= vocab_size fails naming the id and the document, leaving nothing behind."""

    class Small(ByteTokenizer):
        vocab_size = 50

    with pytest.raises(ValueError, match=r"token id 100 .*'d0'"):
        write_token_shards(_docs(["a"]), Small(), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Atomicity


def _failing_docs() -> Iterator[Document]:
    yield from _docs(["ab", "cd"])
    raise RuntimeError("upstream step failed")


def test_failure_leaves_no_dataset_and_no_temp_dir(tmp_path: Path) -> None:
    """If the documents raise mid-write, out_dir is not created and no temporary dir remains."""
    with pytest.raises(RuntimeError, match="upstream step failed"):
        write_token_shards(_failing_docs(), ByteTokenizer(), tmp_path / "ds", shard_tokens=4)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_dataset(tmp_path: Path) -> None:
    """A failed overwrite leaves the previous dataset byte-for-byte intact."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(RuntimeError):
        write_token_shards(_failing_docs(), ByteTokenizer(), tmp_path / "ds", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    """A non-empty out_dir is refused without overwrite=True and replaced with it."""
    write_token_shards(_docs(["old"]), ByteTokenizer(), tmp_path / "ds")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_token_shards(_docs(["new"]), ByteTokenizer(), tmp_path / "ds")
    write_token_shards(_docs(["new", "er"]), ByteTokenizer(), tmp_path / "ds", overwrite=True)
    shards = TokenShards(tmp_path / "ds")
    assert [d.tolist() for d in shards] == [_expected("new"), _expected("er")]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_empty_existing_directory_is_used(tmp_path: Path) -> None:
    """An existing empty out_dir (e.g. made by a job scheduler) is filled without overwrite."""
    (tmp_path / "ds").mkdir()
    write_token_shards(_docs(["a"]), ByteTokenizer(), tmp_path / "ds")
    assert len(TokenShards(tmp_path / "ds")) == 1


# --------------------------------------------------------------------------------------------
# Reading errors


def _rewrite_manifest(path: Path, **changes: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_unknown_format_is_named(tmp_path: Path) -> None:
    """A manifest with another format fails with an error naming that format."""
    write_token_shards(_docs(["a"]), ByteTokenizer(), tmp_path / "ds")
    _rewrite_manifest(tmp_path / "ds", format="megatron-indexed")
    with pytest.raises(ValueError, match="unknown token shard format 'megatron-indexed'"):
        TokenShards(tmp_path / "ds")


def test_unknown_version_is_named(tmp_path: Path) -> None:
    """A manifest with a newer format_version fails naming the version."""
    write_token_shards(_docs(["a"]), ByteTokenizer(), tmp_path / "ds")
    _rewrite_manifest(tmp_path / "ds", format_version=2, new_field="x")
    with pytest.raises(ValueError, match="format_version 2"):
        TokenShards(tmp_path / "ds")


def test_missing_manifest(tmp_path: Path) -> None:
    """A directory without manifest.json is not a dataset, and the error says so."""
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        TokenShards(tmp_path)


def test_truncated_shard_file_is_detected(tmp_path: Path) -> None:
    """A token file shorter than the manifest says fails at open, naming the file and sizes."""
    write_token_shards(_docs(TEXTS), ByteTokenizer(), tmp_path / "ds")
    token_file = tmp_path / "ds" / "shard-00000.bin"
    token_file.write_bytes(token_file.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"shard-00000\.bin.*bytes"):
        TokenShards(tmp_path / "ds")


# --------------------------------------------------------------------------------------------
# Packing for training


def test_sample_sequences_in_order_packs_with_document_ids(tmp_path: Path) -> None:
    """Unshuffled packing concatenates documents, cuts seq_len windows, tags tokens by document."""
    texts = ["ab", "c", "defgh"]  # 4 + 3 + 7 = 14 tokens
    write_token_shards(_docs(texts), ByteTokenizer(), tmp_path / "ds", shard_tokens=5)
    windows = list(TokenShards(tmp_path / "ds").sample_sequences(5, seed=0, shuffle=False))
    stream = _expected("ab") + _expected("c") + _expected("defgh")
    ids = [0] * 4 + [1] * 3 + [2] * 7
    assert len(windows) == 2  # the last 4 tokens do not fill a window
    for w, (tokens, document_ids) in enumerate(windows):
        assert tokens.dtype == np.uint32 and document_ids.dtype == np.int64
        assert tokens.tolist() == stream[5 * w : 5 * w + 5]
        assert document_ids.tolist() == ids[5 * w : 5 * w + 5]


def test_sample_sequences_shuffle_is_seeded(tmp_path: Path) -> None:
    """The same seed gives the same windows; every window's tokens match its document ids."""
    texts = [chr(97 + i) * (i + 1) for i in range(20)]
    write_token_shards(_docs(texts), ByteTokenizer(), tmp_path / "ds", shard_tokens=16)
    shards = TokenShards(tmp_path / "ds")
    first = list(shards.sample_sequences(8, seed=3))
    again = list(shards.sample_sequences(8, seed=3))
    other = list(shards.sample_sequences(8, seed=4))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    for tokens, document_ids in first:
        for token, doc in zip(tokens.tolist(), document_ids.tolist(), strict=True):
            assert token in _expected(texts[doc])


def test_decreasing_offsets_are_refused(tmp_path: Path) -> None:
    """An index whose offsets go backwards (a corrupt file) is refused when the dataset opens."""
    import numpy as np

    write_token_shards([Document(id=str(i), text=t) for i, t in enumerate(["ab", "cde", "f"])],
                       ByteTokenizer(), tmp_path / "ds")  # fmt: skip
    index = next((tmp_path / "ds").glob("*.idx.npy"))
    offsets = np.load(index)
    offsets[1], offsets[2] = offsets[2], offsets[1]
    np.save(index, offsets)
    with pytest.raises(ValueError, match="never decreasing"):
        TokenShards(tmp_path / "ds")


def test_sample_sequences_resume_at_window_k(tmp_path: Path) -> None:
    """start=k yields exactly the windows from the k-th on of a full pass (exact resumption), and
    a full pass covers the concatenated documents in the seeded order, tail dropped."""
    import numpy as np

    texts = ["abcdefg", "hi", "jklmnopqrstu", "v", "wxyz0123"]
    write_token_shards([Document(id=str(i), text=t) for i, t in enumerate(texts)],
                       ByteTokenizer(), tmp_path / "ds", shard_tokens=12)  # fmt: skip
    shards = TokenShards(tmp_path / "ds")
    full = list(shards.sample_sequences(5, seed=3))
    order = np.random.default_rng(3).permutation(len(texts))
    stream = np.concatenate([shards.document(int(i)) for i in order])
    ids = np.concatenate([np.full(shards.document(int(i)).size, i) for i in order])
    assert len(full) == stream.size // 5
    for k, (tokens, document_ids) in enumerate(full):
        assert tokens.tolist() == stream[5 * k : 5 * k + 5].tolist()
        assert document_ids.tolist() == ids[5 * k : 5 * k + 5].tolist()
    for k in range(len(full) + 1):
        resumed = list(shards.sample_sequences(5, seed=3, start=k))
        assert [t.tolist() for t, _ in resumed] == [t.tolist() for t, _ in full[k:]]
    with pytest.raises(ValueError, match="start must be >= 0"):
        next(shards.sample_sequences(5, seed=3, start=-1))


def test_window_stream_skips_without_reading(tmp_path: Path) -> None:
    """`skip(n)` then reading gives exactly the windows a full pass has at those places, in any
    interleaving; skipping past the end reports the whole windows there were; skipped windows'
    tokens are never read (only document lengths, from the offsets)."""
    texts = ["abcdefg", "hi", "jklmnopqrstu", "v", "wxyz0123", "456789"]
    write_token_shards([Document(id=str(i), text=t) for i, t in enumerate(texts)],
                       ByteTokenizer(), tmp_path / "ds", shard_tokens=12)  # fmt: skip
    shards = TokenShards(tmp_path / "ds")
    full = [(t.tolist(), d.tolist()) for t, d in shards.sample_sequences(4, seed=1)]
    assert len(full) >= 8
    for pattern in ([1, 0, 2, 1, 0], [0, 3, 0, 0, 1], [2, 2, 2]):
        stream = shards.sample_sequences(4, seed=1)
        position, got, want = 0, [], []
        for n in pattern:  # skip n windows, then read one
            assert stream.skip(n) == n
            position += n
            tokens, ids = next(stream)
            got.append((tokens.tolist(), ids.tolist()))
            want.append(full[position])
            position += 1
        assert got == want
    stream = shards.sample_sequences(4, seed=1, start=2)
    assert stream.skip(100) == len(full) - 2  # the stream then ends
    assert next(stream, None) is None
    with pytest.raises(ValueError, match="cannot skip -1"):
        shards.sample_sequences(4, seed=1).skip(-1)

    read: list[int] = []
    document = shards.document

    def recording(i: int) -> npt.NDArray[np.uint32]:
        read.append(i)
        return document(i)

    shards.document = recording  # type: ignore[method-assign]
    stream = shards.sample_sequences(4, seed=1)
    stream.skip(len(full) - 1)
    assert read == []  # lengths only
    next(stream)
    assert 0 < len(read) <= 4  # the last window's documents (at most one per token)
    assert all(shards.document_length(i) == len(document(i)) for i in range(len(texts)))
