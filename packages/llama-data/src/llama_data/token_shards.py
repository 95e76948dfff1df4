"""Reading token shards: `TokenShards` memory-maps a directory written by `write_token_shards`.

This is the side llama-train uses (DESIGN.md, "Token shards"): documents by index or in order,
without loading the dataset, and `sample_sequences` packing documents into fixed-length windows with
a document id per token for the cross-document attention mask of §3.2.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from llama_data.shards import (
    OFFSET_DTYPE,
    TOKEN_DTYPE,
    Manifest,
    ShardInfo,
    TokenizerInfo,
)

__all__ = ["TokenShards", "WindowStream"]


class TokenShards:
    """A token shard directory, read lazily with `numpy.memmap`: documents by index or in order.

    Opening checks the manifest (format, version, counts) and that every shard's files match it
    in size; `verify` also checks the token files' SHA-256. Arrays returned are read-only views
    into the memory-mapped files (copy them to modify).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest: Manifest = Manifest.read(self.path)
        """The validated manifest."""
        self._offsets: list[npt.NDArray[np.int64]] = []
        self._tokens: dict[int, npt.NDArray[np.uint32]] = {}
        for shard in self.manifest.shards:
            self._offsets.append(self._open_offsets(shard))
            token_path = self.path / shard.file
            size = token_path.stat().st_size if token_path.is_file() else None
            if size != shard.num_tokens * TOKEN_DTYPE.itemsize:
                raise ValueError(
                    f"token shard {token_path} is {size} bytes but the manifest says "
                    f"{shard.num_tokens} uint32 tokens ({shard.num_tokens * 4} bytes); the "
                    "dataset is incomplete or corrupt"
                )
        # First global document index of each shard, plus the total: [num_shards + 1].
        self._first_document = np.cumsum(
            [0, *(shard.num_documents for shard in self.manifest.shards)], dtype=np.int64
        )

    def _open_offsets(self, shard: ShardInfo) -> npt.NDArray[np.int64]:
        index_path = self.path / shard.index
        offsets = np.load(index_path, mmap_mode="r", allow_pickle=False)
        expected = (shard.num_documents + 1,)
        if (
            offsets.shape != expected
            or offsets.dtype != OFFSET_DTYPE
            or offsets[0] != 0
            or offsets[-1] != shard.num_tokens
            or bool(np.any(np.diff(offsets) < 0))
        ):
            raise ValueError(
                f"offsets file {index_path} has shape {offsets.shape}, dtype {offsets.dtype}, "
                f"but the manifest expects {expected} int64 offsets from 0 to "
                f"{shard.num_tokens}, never decreasing; the dataset is corrupt"
            )
        return cast(npt.NDArray[np.int64], offsets)

    def __len__(self) -> int:
        """Number of documents."""
        return self.manifest.num_documents

    @property
    def tokenizer(self) -> TokenizerInfo:
        """The tokenizer that wrote the shards (``manifest.tokenizer``): sources mixed in one
        training run must have equal ``tokenizer.sha256`` ("unknown" in old manifests)."""
        return self.manifest.tokenizer

    @property
    def num_tokens(self) -> int:
        """Number of tokens in all shards."""
        return self.manifest.num_tokens

    @property
    def num_shards(self) -> int:
        """Number of shard files."""
        return len(self.manifest.shards)

    def shard(self, j: int) -> npt.NDArray[np.uint32]:
        """The tokens of shard `j`, memory-mapped read-only."""
        if not 0 <= j < self.num_shards:
            raise IndexError(f"shard index {j} out of range for {self.num_shards} shards")
        if j not in self._tokens:
            shard = self.manifest.shards[j]
            if shard.num_tokens == 0:  # mmap refuses empty files
                self._tokens[j] = np.zeros(0, dtype=TOKEN_DTYPE)
            else:
                self._tokens[j] = np.memmap(self.path / shard.file, dtype=TOKEN_DTYPE, mode="r")
        return self._tokens[j]

    def shard_offsets(self, j: int) -> npt.NDArray[np.int64]:
        """The document offsets of shard `j` (``num_documents + 1`` values, 0 first)."""
        if not 0 <= j < self.num_shards:
            raise IndexError(f"shard index {j} out of range for {self.num_shards} shards")
        return self._offsets[j]

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, index within the shard) of document `i` (negative counts from the end)."""
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document index {i} out of range for {n} documents")
        i %= n
        j = int(np.searchsorted(self._first_document, i, side="right")) - 1
        return j, i - int(self._first_document[j])

    def document(self, i: int) -> npt.NDArray[np.uint32]:
        """The tokens of document `i` (negative counts from the end), a read-only view."""
        j, local = self._locate(i)
        offsets = self._offsets[j]
        return self.shard(j)[int(offsets[local]) : int(offsets[local + 1])]

    def document_length(self, i: int) -> int:
        """The number of tokens of document `i`, from the offsets alone (no token read)."""
        j, local = self._locate(i)
        offsets = self._offsets[j]
        return int(offsets[local + 1]) - int(offsets[local])

    def __getitem__(self, i: int) -> npt.NDArray[np.uint32]:
        """Same as `document`."""
        return self.document(i)

    def __iter__(self) -> Iterator[npt.NDArray[np.uint32]]:
        """Every document's tokens, in order."""
        for j in range(self.num_shards):
            tokens = self.shard(j)
            offsets = self._offsets[j]
            for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
                yield tokens[start:end]

    def verify(self) -> None:
        """Check every token file against its SHA-256 in the manifest; raise naming the first bad one."""
        for shard in self.manifest.shards:
            if shard.sha256 is None:
                continue
            digest = hashlib.sha256()
            with (self.path / shard.file).open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard.sha256:
                raise ValueError(
                    f"token shard {self.path / shard.file} has sha256 {digest.hexdigest()}, the "
                    f"manifest says {shard.sha256}; the file is corrupt"
                )

    def sample_sequences(
        self, seq_len: int, *, seed: int, shuffle: bool = True, start: int = 0
    ) -> WindowStream:
        """Pack documents into windows of `seq_len` tokens, with each token's document index.

        Documents are taken in a random order drawn from `seed` (or in order if not `shuffle`)
        and concatenated; the stream is cut into consecutive windows, so a long document
        continues into the next window. Yields ``(tokens [seq_len] uint32, document_ids
        [seq_len] int64)``, where ``document_ids[t]`` is the global index of the document
        token ``t`` came from: equal ids mark tokens that may attend to each other (§3.2).
        The final partial window is dropped. Each yielded pair is a fresh array.

        `start` skips the first `start` windows without reading their tokens (only document
        lengths), so a resumed training run continues with exactly the window it would have
        seen next: `sample_sequences(..., start=k)` yields what the k-th and later windows of
        `sample_sequences(...)` are. The returned `WindowStream` can also `skip` windows later
        (a data-parallel rank passes over the other ranks' rows without reading them).
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if start < 0:
            raise ValueError(f"start must be >= 0 (a window index), got {start}")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        stream = WindowStream(self, seq_len, order)
        stream.skip(start)
        return stream


class WindowStream(Iterator[tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]]):
    """The windows of `TokenShards.sample_sequences`: an iterator of ``(tokens, document_ids)``
    that can also `skip` windows, reading only document lengths for them."""

    def __init__(self, shards: TokenShards, seq_len: int, order: npt.NDArray[np.int64]) -> None:
        self._shards = shards
        self.seq_len = seq_len
        self._order = order  # document indices in stream order (numpy: no Python list of them)
        self._next = 0  # position in `_order` of the next document to open
        self._doc_index = -1  # the open document, its length and the tokens already passed
        self._doc_size = 0
        self._position = 0
        self._tokens: npt.NDArray[np.uint32] | None = None  # its memmap view, once read from

    def _open_next(self) -> bool:
        """Open the next document in the order (its length only); False at the end."""
        if self._next >= len(self._order):
            return False
        self._doc_index = int(self._order[self._next])
        self._doc_size = self._shards.document_length(self._doc_index)
        self._tokens = None
        self._next += 1
        self._position = 0
        return True

    def skip(self, windows: int) -> int:
        """Pass over the next `windows` windows without reading their tokens; returns how many
        whole windows there were (fewer than asked at the end of the stream, which then ends)."""
        if windows < 0:
            raise ValueError(f"cannot skip {windows} windows")
        need, passed = windows * self.seq_len, 0  # in tokens: a loop per document, not window
        while passed < need:
            left = self._doc_size - self._position
            if left == 0:
                if not self._open_next():
                    return passed // self.seq_len
                continue
            step = min(left, need - passed)
            self._position += step
            passed += step
        return windows

    def __next__(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        tokens = np.empty(self.seq_len, dtype=np.uint32)
        document_ids = np.empty(self.seq_len, dtype=np.int64)
        filled = 0
        while filled < self.seq_len:
            left = self._doc_size - self._position
            if left == 0:
                if not self._open_next():
                    raise StopIteration  # the final partial window is dropped
                continue
            if self._tokens is None:
                self._tokens = self._shards.document(self._doc_index)  # a memmap view
            take = min(self.seq_len - filled, left)
            tokens[filled : filled + take] = self._tokens[self._position : self._position + take]
            document_ids[filled : filled + take] = self._doc_index
            filled += take
            self._position += take
        return tokens, document_ids
