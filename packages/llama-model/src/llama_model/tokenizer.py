"""The Llama 3 tokenizer: byte-level BPE over a 128,000-token tiktoken vocabulary plus 256 specials.

Llama 3 (arXiv 2407.21783, §3.1.2 "Tokenizer") uses a 128K-token vocabulary: 100K tokens from
tiktoken and 28K extra tokens for non-English languages. Meta's reference implementation
(`llama_models/llama3/tokenizer.py` in the `llama-models` package) wraps `tiktoken` with a
pre-tokenization regex and 256 special tokens at ids 128000..128255; this module reproduces its
behaviour token for token, including how it splits very long inputs before handing them to
tiktoken. The real `tokenizer.model` file is loaded from the installed `llama-models` package by
`Tokenizer.llama3()`; it is never copied into this repository.

The model file is tiktoken's BPE format: one line per token, `<base64 bytes> <rank>`, where the
rank is both the token id and the merge priority (lower merges first).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.resources
import operator
import os
import re
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

__all__ = ["Tokenizer"]

# The Llama 3 pre-tokenization regex, as in Meta's reference `Tokenizer.pat_str`. It splits text
# into contraction suffixes, letter runs (with one optional leading non-letter), numbers of at most
# three digits, punctuation runs, line breaks and other whitespace; BPE then runs inside each piece.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Meta's reference reserves exactly 256 special-token ids right after the BPE ranks.
NUM_SPECIAL_TOKENS = 256

# The named special tokens in id order, as in Meta's reference; the remaining ids are
# `<|reserved_special_token_2|>` onwards.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model stops to wait for a tool result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken panics on inputs much longer than this; Meta's reference encodes in chunks of this size.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000

# tiktoken's regex backtracking is quadratic in long runs of whitespace or of non-whitespace
# (openai/tiktoken#195); Meta's reference cuts every such run into pieces of at most this length.
MAX_NO_WHITESPACES_CHARS = 25_000

# A maximal run of whitespace or of non-whitespace; Python's `\s` is exactly `str.isspace`.
_RUN = re.compile(r"\s+|\S+")


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3 special-token strings in id order (id = 128000 + index)."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
    ]
    return [*_NAMED_SPECIAL_TOKENS, *reserved]


def load_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`<base64 token> <rank>` per line) into a bytes -> rank dict.

    Blank lines are skipped. Ranks must be exactly 0..n-1 (each once), because they double as
    token ids. Raises FileNotFoundError for a missing file and ValueError naming the path and line
    for anything malformed.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model file not found: {str(path)!r}; pass the path of a tiktoken BPE file "
            "(for the real Llama 3 tokenizer use Tokenizer.llama3())"
        )
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(
                    f"{path}:{line_number}: expected '<base64 token> <rank>', got {line.rstrip()!r}"
                )
            token_b64, rank_text = fields
            try:
                token = base64.b64decode(token_b64, validate=True)
                rank = int(rank_text)
            except (binascii.Error, ValueError) as err:
                raise ValueError(
                    f"{path}:{line_number}: cannot parse {line.rstrip()!r} as "
                    f"'<base64 token> <rank>': {err}"
                ) from err
            if token in ranks:
                raise ValueError(
                    f"{path}:{line_number}: token {token!r} already has rank {ranks[token]}"
                )
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: the tokenizer model file has no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{path}: ranks must be 0..{len(ranks) - 1}, each exactly once, because they are the "
            "token ids; this file's ranks have gaps or duplicates"
        )
    return ranks


def split_long_runs(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut `text` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Cut points fall every `max_run` characters inside each maximal run, counted from the run's
    start, which is where Meta's reference `_split_whitespaces_or_nonwhitespaces` cuts; the pieces
    concatenate back to `text`. Always yields at least one (possibly empty) piece.
    """
    start = 0
    for run in _RUN.finditer(text):
        run_start, run_end = run.span()
        for cut in range(run_start + max_run, run_end, max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer:
    """A tiktoken BPE tokenizer with the Llama 3 pre-tokenization regex and 256 special tokens.

    Token ids 0..n-1 are the BPE ranks from the model file; ids n..n+255 are the special tokens
    (for Llama 3, n = 128000). Use `Tokenizer.llama3()` for the real Llama 3 tokenizer.
    """

    pat_str: str = LLAMA3_PAT_STR

    def __init__(self, model_path: str | os.PathLike[str], *, name: str | None = None) -> None:
        """Load a tiktoken BPE file; `name` (default: the file name) labels it in data manifests."""
        path = Path(model_path)
        # The BPE vocabulary, token bytes -> rank (= token id); the Hugging Face export needs it.
        self.mergeable_ranks: dict[bytes, int] = load_tiktoken_bpe(path)
        # Hex SHA-256 of the model file's bytes: names the exact vocabulary in data manifests.
        self.sha256: str = hashlib.sha256(path.read_bytes()).hexdigest()
        self.name: str = name if name is not None else path.name
        num_base_tokens = len(self.mergeable_ranks)
        # Special-token string -> id, in id order.
        self.special_tokens: dict[str, int] = {
            token: num_base_tokens + i for i, token in enumerate(llama3_special_tokens())
        }
        self._model = tiktoken.Encoding(
            name=self.name,
            pat_str=self.pat_str,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size: int = num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]
        # Generation stops on any of these, as in Meta's reference `stop_tokens`.
        self.stop_tokens: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    @classmethod
    def llama3(cls) -> Tokenizer:
        """The real Llama 3 tokenizer, from `llama_models/llama3/tokenizer.model` (loaded once)."""
        return _load_llama3()

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        text: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    ) -> list[int]:
        """Encode `text` to token ids, optionally wrapped in `<|begin_of_text|>`/`<|end_of_text|>`.

        Special-token strings in `text` (e.g. "<|eot_id|>") are encoded as ordinary text unless
        listed in `allowed_special` ("all" allows every one). Inputs of any length are safe: they
        are split as Meta's reference splits them, so the ids are identical to the reference's.
        """
        if not isinstance(text, str):
            raise TypeError(
                f"Tokenizer.encode expects a str, got {type(text).__name__}: {text!r:.80}"
            )
        if allowed_special != "all":
            unknown = sorted(set(allowed_special) - self.special_tokens.keys())
            if unknown:
                raise ValueError(
                    f"allowed_special names unknown special tokens {unknown}; "
                    "use strings from Tokenizer.special_tokens or 'all'"
                )
        ids: list[int] = [self.bos_id] if bos else []
        for offset in range(0, max(len(text), 1), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = text[offset : offset + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in split_long_runs(chunk):
                ids.extend(
                    self._model.encode(
                        piece, allowed_special=allowed_special, disallowed_special=()
                    )
                )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        """Decode token ids to text; invalid UTF-8 byte sequences become U+FFFD, as in tiktoken."""
        ids = [operator.index(t) for t in tokens]
        for position, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"token id {token} at position {position} is out of range: "
                    f"ids must be in [0, {self.vocab_size})"
                )
        return self._model.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a piece of a UTF-8 character, possibly); a special
        token's bytes are its string's."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(
                f"token id {token} is out of range: ids must be in [0, {self.vocab_size})"
            )
        return self._model.decode_single_token_bytes(token)

    def token_id(self, piece: str) -> int:
        """The id of a special-token string such as "<|eot_id|>"."""
        try:
            return self.special_tokens[piece]
        except KeyError:
            raise KeyError(
                f"{piece!r} is not a special token of this tokenizer; special tokens look like "
                "'<|eot_id|>' (see Tokenizer.special_tokens)"
            ) from None


@functools.cache
def _load_llama3() -> Tokenizer:
    """Load (once per process) the Llama 3 `tokenizer.model` shipped in the `llama-models` package."""
    resource = importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"
    with importlib.resources.as_file(resource) as path:
        return Tokenizer(path, name="llama3")
