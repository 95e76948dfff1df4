"""Token shards: the dataset llama-data hands to llama-train (DESIGN.md, "Token shards").

`write_token_shards` tokenizes a stream of documents into a directory that
`llama_data.token_shards.TokenShards` (or any program with numpy) reads back with `numpy.memmap`,
never loading it whole:

```
out_dir/
  manifest.json          format, version, tokenizer identity, counts, per-shard files, mixture
  shard-00000.bin        little-endian uint32 tokens, documents concatenated
  shard-00000.idx.npy    int64 document start offsets into the .bin, plus a final end offset
  shard-00001.bin ...
```

Document ``i`` of a shard is ``tokens[offsets[i]:offsets[i + 1]]``. A document is never split
across shards (one longer than ``shard_tokens`` gets a shard of its own), so document boundaries
survive and training can mask attention across documents (§3.2 of the Llama 3 paper: "we use an
attention mask that prevents self-attention between different documents within the same
sequence"). `TokenShards.sample_sequences` packs documents into fixed-length windows with a
document id per token for exactly that mask.

Writing is atomic: everything goes into a temporary directory next to ``out_dir`` that
`llama_data._atomic.publish_directory` fsyncs and renames into place only when complete (DESIGN.md:
"a failed write leaves the previous good file in place").
llama-data never imports torch: the tokenizer is anything with ``encode`` (see `ShardTokenizer`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama_data._atomic import publish_directory
from llama_data.document import Document

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Manifest",
    "ShardInfo",
    "ShardTokenizer",
    "SourceMixture",
    "SpecialTokenTokenizer",
    "TokenizerInfo",
    "UNKNOWN_TOKENIZER",
    "write_token_shards",
]

FORMAT_NAME = "llama3-token-shards"
"""The `format` every manifest written here carries."""
FORMAT_VERSION = 1
"""The layout version this module writes and reads; bumped on any incompatible change."""
MANIFEST_FILE = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")  # little-endian uint32 on every machine (DESIGN.md)
OFFSET_DTYPE = np.dtype("<i8")
MAX_VOCAB_SIZE = 2**32  # token ids must fit in uint32
UNKNOWN_TOKENIZER = "unknown"
"""What manifests written before the tokenizer identity was required say in its place."""
DEFAULT_SHARD_TOKENS = 2**28  # 1 GiB of uint32 tokens per shard file


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ShardTokenizer(Protocol):
    """A plain tokenizer: ``encode(text) -> ids`` without special tokens.

    When `write_token_shards` is asked for BOS/EOS it adds ``bos_id``/``eos_id`` (attributes the
    tokenizer must then have) unless the ids already start with ``bos_id`` / end with
    ``eos_id`` (a tokenizer that adds them itself, like Hugging Face's default). Its ``name``
    and ``sha256`` attributes identify it in the manifest; without them, `write_token_shards`
    needs ``tokenizer_name=`` and ``tokenizer_sha256=``.
    """

    @property
    def vocab_size(self) -> int:
        """Number of token ids; every id is in ``[0, vocab_size)``."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""


class SpecialTokenTokenizer(Protocol):
    """A tokenizer that adds BOS/EOS on request, like ``llama_model.Tokenizer``."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids; every id is in ``[0, vocab_size)``."""

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text`, with BOS first if `bos` and EOS last if `eos`."""


def _takes_bos_eos(encode: Callable[..., Any]) -> bool:
    """Whether `encode` accepts ``bos=`` and ``eos=`` keywords (the llama_model shape)."""
    try:
        parameters = inspect.signature(encode).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume the plain shape
        return False
    keyword_kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return all(
        name in parameters and parameters[name].kind in keyword_kinds for name in ("bos", "eos")
    )


def _special_id(tokenizer: object, attribute: str, flag: str) -> int:
    value = getattr(tokenizer, attribute, None)
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ValueError(
            f"{flag}=True needs the tokenizer's {attribute} (an int), but "
            f"{type(tokenizer).__name__}.{attribute} is {value!r}; give the tokenizer a "
            f"{attribute} attribute or pass {flag}=False"
        )
    return int(value)


class _Encoder:
    """Adapts either tokenizer shape to ``text -> uint32 token array`` with BOS/EOS as asked."""

    def __init__(
        self, tokenizer: ShardTokenizer | SpecialTokenTokenizer, *, add_bos: bool, add_eos: bool
    ) -> None:
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(
                f"tokenizer {type(tokenizer).__name__} has no encode(text) method; pass an object "
                "with encode(str) -> list[int] or encode(str, *, bos, eos) -> list[int]"
            )
        self.vocab_size = _vocab_size(tokenizer)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self._tokenizer = tokenizer
        self.adds_special_tokens = _takes_bos_eos(tokenizer.encode)
        self.bos_id = (
            _special_id(tokenizer, "bos_id", "add_bos")
            if add_bos and not self.adds_special_tokens
            else None
        )
        self.eos_id = (
            _special_id(tokenizer, "eos_id", "add_eos")
            if add_eos and not self.adds_special_tokens
            else None
        )

    def __call__(self, doc: Document) -> npt.NDArray[np.uint32]:
        if self.adds_special_tokens:
            tokenizer = cast(SpecialTokenTokenizer, self._tokenizer)
            ids = tokenizer.encode(doc.text, bos=self.add_bos, eos=self.add_eos)
        else:
            ids = list(cast(ShardTokenizer, self._tokenizer).encode(doc.text))
            if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids.insert(0, self.bos_id)
            if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
        try:
            array = np.asarray(ids, dtype=np.int64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValueError(
                f"tokenizer returned non-integer or out-of-range ids for document {doc.id!r}: {exc}"
            ) from exc
        if array.ndim != 1:
            raise ValueError(
                f"tokenizer returned ids of shape {array.shape} for document {doc.id!r}; "
                "expected a flat list of ints"
            )
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = int(array.min()) if array.min() < 0 else int(array.max())
            raise ValueError(
                f"tokenizer returned token id {bad} for document {doc.id!r}, outside "
                f"[0, vocab_size={self.vocab_size})"
            )
        return array.astype(np.uint32)


def _vocab_size(tokenizer: object) -> int:
    value = getattr(tokenizer, "vocab_size", None)
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} needs an int vocab_size attribute, got "
            f"{value!r}; the manifest records it and token ids are checked against it"
        )
    if not 1 <= value <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer vocab_size {value} does not fit the uint32 token shards; it must be in "
            f"[1, 2**32]"
        )
    return int(value)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HOW_TO_NAME = (
    "the sha256 of the tokenizer's model file (hashlib.sha256(path.read_bytes()).hexdigest()), "
    "or, for a tokenizer defined in code, of a string that defines it"
)


def _tokenizer_identity(tokenizer: object, name: str | None, sha256: str | None) -> tuple[str, str]:
    """(name, sha256) from the explicit arguments or the tokenizer's attributes; never "unknown".

    llama-train compares the sha256 of every source of a run, so a dataset must say which
    tokenizer wrote it. An explicit `name` labels the tokenizer; an explicit `sha256` that
    contradicts the tokenizer's own ``sha256`` attribute is an error.
    """
    kind = type(tokenizer).__name__
    own_name = getattr(tokenizer, "name", None)
    own_sha256 = getattr(tokenizer, "sha256", None)
    if sha256 is not None and isinstance(own_sha256, str) and own_sha256.lower() != sha256.lower():
        raise ValueError(
            f"tokenizer_sha256={sha256!r} contradicts {kind}.sha256={own_sha256!r}; pass the "
            "tokenizer that matches, or drop tokenizer_sha256 to record its own"
        )
    name = name if name is not None else own_name
    sha256 = sha256 if sha256 is not None else own_sha256
    missing = [
        (argument, attribute)
        for argument, attribute, value in (
            ("tokenizer_name", "name", name),
            ("tokenizer_sha256", "sha256", sha256),
        )
        if not (isinstance(value, str) and value.strip())
    ]
    if missing:
        attributes = " or ".join(attribute for _, attribute in missing)
        arguments = ", ".join(f"{argument}=..." for argument, _ in missing)
        raise ValueError(
            f"write_token_shards records which tokenizer wrote the shards (llama-train checks "
            f"that every source of a run shares one), but {kind} has no {attributes} attribute (found "
            f"name={own_name!r}, sha256={own_sha256!r}); pass {arguments} ({_HOW_TO_NAME})"
        )
    assert isinstance(name, str) and isinstance(sha256, str)  # checked just above
    if name.strip().lower() == UNKNOWN_TOKENIZER:
        raise ValueError(
            f"tokenizer name {name!r} is what old manifests say when they could not tell; "
            "give the tokenizer's real name (tokenizer_name=...)"
        )
    if not _SHA256_HEX.fullmatch(sha256.lower()):
        raise ValueError(
            f"tokenizer sha256 {sha256!r} is not 64 hexadecimal digits; pass "
            f"tokenizer_sha256=... ({_HOW_TO_NAME})"
        )
    return name.strip(), sha256.lower()


# ---------------------------------------------------------------------------------------------
# Manifest

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid")


class TokenizerInfo(BaseModel):
    """Which tokenizer produced the tokens; llama-train checks that the sources of a run agree.

    `write_token_shards` always records a real name and sha256. Manifests written by llama-data
    before it required them may say "unknown" (`UNKNOWN_TOKENIZER`) in either field: they still
    read, but their identity cannot be compared.
    """

    model_config = _MODEL_CONFIG

    name: str
    """The tokenizer's name (e.g. "llama3"): a label for people; compare `sha256`."""
    sha256: str
    """SHA-256 (64 lowercase hex digits) of the tokenizer's model file or definition: the
    identity two datasets must share to be mixed; "unknown" in old manifests."""
    vocab_size: int = Field(ge=1, le=MAX_VOCAB_SIZE)
    """Number of token ids; every token in the shards is below it."""

    @property
    def known(self) -> bool:
        """Whether the identity was recorded (False for old manifests that say "unknown")."""
        return self.sha256 != UNKNOWN_TOKENIZER


class ShardInfo(BaseModel):
    """One shard: its token file, its offsets file, and what they hold."""

    model_config = _MODEL_CONFIG

    file: str
    """Token file name, relative to the dataset directory (e.g. "shard-00000.bin")."""
    index: str
    """Offsets file name (e.g. "shard-00000.idx.npy"): ``num_documents + 1`` int64 offsets."""
    num_tokens: int = Field(ge=0)
    """Tokens in the file (its size is ``4 * num_tokens`` bytes)."""
    num_documents: int = Field(ge=0)
    """Documents in the file."""
    sha256: str | None = None
    """SHA-256 of the token file, checked by `TokenShards.verify`."""


class SourceMixture(BaseModel):
    """How much of the dataset came from one source (``Document.source``)."""

    model_config = _MODEL_CONFIG

    documents: int = Field(ge=0)
    """Documents from this source."""
    tokens: int = Field(ge=0)
    """Tokens from this source, BOS/EOS included."""
    weight: float | None = None
    """The mixture weight given to `write_token_shards` for this source, if any."""


class Manifest(BaseModel):
    """``manifest.json`` of a token shard directory: what is in it and how to read it."""

    model_config = _MODEL_CONFIG

    format: str = FORMAT_NAME
    """Always "llama3-token-shards"; anything else is not this layout."""
    format_version: int = FORMAT_VERSION
    """Layout version; readers refuse versions they do not know."""
    tokenizer: TokenizerInfo
    """The tokenizer that produced the tokens."""
    num_tokens: int = Field(ge=0)
    """Tokens in all shards."""
    num_documents: int = Field(ge=0)
    """Documents in all shards."""
    shards: tuple[ShardInfo, ...]
    """The shards, in document order."""
    mixture: dict[str, SourceMixture]
    """Per source: documents, tokens, and the given mixture weight."""
    created_at: datetime
    """When the dataset was written (UTC)."""

    @model_validator(mode="before")
    @classmethod
    def _check_format(cls, data: Any) -> Any:
        # Before field validation, so a future layout fails with this message, not a field list.
        if isinstance(data, dict):
            found = data.get("format", FORMAT_NAME)
            if found != FORMAT_NAME:
                raise ValueError(
                    f"unknown token shard format {found!r}; this reader reads {FORMAT_NAME!r}"
                )
            version = data.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"unsupported {FORMAT_NAME} format_version {version!r}; this llama-data "
                    f"reads version {FORMAT_VERSION} (upgrade llama-data for newer datasets)"
                )
        return data

    @model_validator(mode="after")
    def _check_counts(self) -> Manifest:
        shard_tokens = sum(shard.num_tokens for shard in self.shards)
        shard_documents = sum(shard.num_documents for shard in self.shards)
        if (shard_tokens, shard_documents) != (self.num_tokens, self.num_documents):
            raise ValueError(
                f"manifest says {self.num_tokens} tokens and {self.num_documents} documents but "
                f"its shards hold {shard_tokens} and {shard_documents}"
            )
        return self

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """The validated manifest of the dataset in `directory`."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {str(directory)!r} is not a token shard directory "
                "(write one with write_token_shards)"
            )
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise ValueError(f"invalid token shard manifest {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Writing


def _shard_names(number: int) -> tuple[str, str]:
    return f"shard-{number:05d}.bin", f"shard-{number:05d}.idx.npy"


class _ShardWriter:
    """Streams documents into numbered shard files in `directory`, closing one when it is full."""

    def __init__(self, directory: Path, shard_tokens: int) -> None:
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._offsets: list[int] = [0]

    def add(self, tokens: npt.NDArray[np.uint32]) -> None:
        """Append one document, starting a new shard first if it would overflow this one."""
        in_shard = self._offsets[-1]
        if self._file is not None and in_shard + tokens.size > self.shard_tokens:
            self.close_shard()
        if self._file is None:
            self._file = (self.directory / _shard_names(len(self.shards))[0]).open("wb")
        data = tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + tokens.size)

    def close_shard(self) -> None:
        """Finish the open shard: close its tokens, write its offsets (`publish_directory`
        fsyncs every file before the dataset appears)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        token_file, index_file = _shard_names(len(self.shards))
        with (self.directory / index_file).open("wb") as fh:
            np.save(fh, np.asarray(self._offsets, dtype=OFFSET_DTYPE))
        self.shards.append(
            ShardInfo(
                file=token_file,
                index=index_file,
                num_tokens=self._offsets[-1],
                num_documents=len(self._offsets) - 1,
                sha256=self._hash.hexdigest(),
            )
        )
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"out_dir {str(out_dir)!r} exists and is not a directory")
        if not overwrite and any(out_dir.iterdir()):
            raise FileExistsError(
                f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True to "
                "replace it (the old dataset is removed only after the new one is complete)"
            )


def _check_mixture(mixture: dict[str, float] | None) -> dict[str, float]:
    weights = dict(mixture or {})
    for source, weight in weights.items():
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"mixture weight for source {source!r} must be a finite number >= 0, got {weight!r}"
            )
    return weights


def write_token_shards(
    docs: Iterable[Document],
    tokenizer: ShardTokenizer | SpecialTokenTokenizer,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    add_bos: bool = True,
    add_eos: bool = True,
    mixture: dict[str, float] | None = None,
    overwrite: bool = False,
    tokenizer_name: str | None = None,
    tokenizer_sha256: str | None = None,
) -> Manifest:
    """Tokenize `docs` into a token shard directory at `out_dir` and return its manifest.

    Each document becomes ``[BOS] + encode(text) + [EOS]`` (as `add_bos`/`add_eos` ask), appended
    to the current shard until the next would push it past `shard_tokens`; a document longer than
    `shard_tokens` gets a shard of its own. `tokenizer` is either shape: ``encode(text)``
    (`ShardTokenizer`; BOS/EOS from its ``bos_id``/``eos_id``) or ``encode(text, *, bos, eos)``
    (`SpecialTokenTokenizer`, e.g. ``llama_model.Tokenizer``), told apart by its signature.
    `mixture` maps sources to the weights they were sampled with; they are recorded with each
    source's document and token counts.

    The manifest records the tokenizer's identity: `tokenizer_name` and `tokenizer_sha256`, or
    else the tokenizer's ``name`` and ``sha256`` attributes (``llama_model.Tokenizer`` has both:
    the sha256 of its model file). With neither, this is an error before anything is written; a
    tokenizer defined in code can pass the sha256 of a string that defines it.

    The dataset is written into a temporary directory beside `out_dir` and renamed into place
    when complete; if anything fails (including `docs` raising), the temporary directory is
    removed and `out_dir` is untouched. An existing non-empty `out_dir` is an error unless
    `overwrite`, and then it is replaced only after the new dataset is complete.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    weights = _check_mixture(mixture)
    encoder = _Encoder(tokenizer, add_bos=add_bos, add_eos=add_eos)
    name, sha256 = _tokenizer_identity(tokenizer, tokenizer_name, tokenizer_sha256)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp_dir.mkdir()  # with the umask's permissions: a dataset is meant to be shared
    writer = _ShardWriter(tmp_dir, shard_tokens)
    per_source: dict[str, list[int]] = {source: [0, 0] for source in weights}
    try:
        for doc in docs:
            tokens = encoder(doc)
            writer.add(tokens)
            counts = per_source.setdefault(doc.source, [0, 0])
            counts[0] += 1
            counts[1] += tokens.size
        writer.close_shard()
        manifest = Manifest(
            tokenizer=TokenizerInfo(name=name, sha256=sha256, vocab_size=encoder.vocab_size),
            num_tokens=sum(shard.num_tokens for shard in writer.shards),
            num_documents=sum(shard.num_documents for shard in writer.shards),
            shards=tuple(writer.shards),
            mixture={
                source: SourceMixture(
                    documents=documents, tokens=tokens_, weight=weights.get(source)
                )
                for source, (documents, tokens_) in sorted(per_source.items())
            },
            created_at=datetime.now(UTC),
        )
        (tmp_dir / MANIFEST_FILE).write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
        _check_out_dir(out_dir, overwrite)  # it may have appeared while we were writing
        publish_directory(tmp_dir, out_dir)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest
