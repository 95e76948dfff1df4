"""Export a `Tokenizer` as a Hugging Face fast tokenizer (`tokenizer.json` + `tokenizer_config.json`).

The interchange checkpoint (DESIGN.md, "Checkpoints") is a Hugging Face Llama directory, so the
tokenizer must load with `transformers.AutoTokenizer` and give the same ids as our tiktoken
`Tokenizer`. tiktoken stores only ranks; Hugging Face's BPE model wants a vocabulary of
byte-level strings and an ordered merge list. Both are derived here:

- vocabulary: each token's bytes written with GPT-2's byte-to-unicode table (Radford et al. 2019,
  `bytes_to_unicode` in openai/gpt-2 `encoder.py`), id = rank;
- merges: for each token of two or more bytes, every split into two tokens that are both in the
  vocabulary, ordered by the merged token's rank. tiktoken always merges the adjacent pair whose
  concatenation has the lowest rank; ordering merges that way makes Hugging Face's BPE (which
  applies the lowest-priority merge first) take the same steps. `ignore_merges` makes a whole
  pre-token that is itself in the vocabulary one token, as tiktoken does.

The pre-tokenizer is the Llama 3 regex (isolated splits) followed by the byte-level mapping, as in
Meta's published Llama 3.1 `tokenizer.json`; the post-processor prepends `<|begin_of_text|>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llama_model.atomic import atomic_write
from llama_model.chat import CHAT_TEMPLATE
from llama_model.tokenizer import Tokenizer

__all__ = ["bytes_to_unicode", "tiktoken_to_hf_bpe", "write_hf_tokenizer"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    U+0100 onwards in byte order, so space (0x20) becomes "Ġ" and newline (0x0A) "Ċ".
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiktoken_to_hf_bpe(mergeable_ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """Derive a Hugging Face BPE `(vocab, merges)` from tiktoken ranks (see the module docstring)."""
    # bytes -> latin-1 str is the identity on byte values; translate then maps each to GPT-2's char.
    translation = {b: c for b, c in bytes_to_unicode().items()}

    def to_unicode(token: bytes) -> str:
        return token.decode("latin-1").translate(translation)

    vocab = {to_unicode(token): rank for token, rank in mergeable_ranks.items()}
    if len(vocab) != len(mergeable_ranks):
        raise ValueError(
            "byte-level mapping is not injective; mergeable_ranks must hold bytes keys"
        )
    merges: list[list[str]] = []
    for token, _rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        splits = [
            (mergeable_ranks[token[:i]], mergeable_ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in mergeable_ranks and token[i:] in mergeable_ranks
        ]
        # Several splits can make the same token; the one of lower-ranked pieces goes first.
        for _left_rank, _right_rank, i in sorted(splits):
            merges.append([to_unicode(token[:i]), to_unicode(token[i:])])
    return vocab, merges


def _tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizers` library's serialised fast tokenizer for `tokenizer`."""
    vocab, merges = tiktoken_to_hf_bpe(tokenizer.mergeable_ranks)
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for content, token_id in tokenizer.special_tokens.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tokenizer.pat_str},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    directory: str | os.PathLike[str],
    *,
    model_max_length: int,
    eos_token: str = "<|eot_id|>",
) -> list[Path]:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` to `directory`.

    The config follows Meta's Llama 3.1 Instruct release: BOS `<|begin_of_text|>`, EOS
    `<|eot_id|>` (pass `eos_token="<|end_of_text|>"` for a base model), class
    `PreTrainedTokenizerFast`, and `CHAT_TEMPLATE` as the chat template. It also sets the pad token
    to `<|finetune_right_pad_id|>` (Meta's reference `pad_id`; the official release sets none, and
    trainers that fall back to padding with EOS would then mask the `<|eot_id|>` labels).
    `clean_up_tokenization_spaces` is off so decoding is exact. Every file is written atomically.
    Returns the written paths.
    """
    if model_max_length <= 0:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")
    if eos_token not in tokenizer.special_tokens:
        raise ValueError(f"eos_token {eos_token!r} is not a special token of {tokenizer!r}")
    out = Path(directory)
    special = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": eos_token,
        "pad_token": "<|finetune_right_pad_id|>",
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    files = {
        # tokenizer.json is large (~9 MB) and read by machines: compact JSON.
        "tokenizer.json": json.dumps(_tokenizer_json(tokenizer), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }
    written = []
    for name, text in files.items():
        with atomic_write(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
