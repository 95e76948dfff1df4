"""Tests for llama_model.tokenizer against Meta's reference tokenizer in `llama_models`."""

from __future__ import annotations

import base64
import hashlib
import itertools
from pathlib import Path
from typing import Any

import llama_models
import pytest
from llama_models.tokenizer_utils import load_bpe_file

from llama_model.tokenizer import Tokenizer, split_long_runs

MODEL_FILE = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def test_encode_matches_reference_for_every_bos_eos(
    tokenizer: Tokenizer, reference_tokenizer: Any, all_texts: dict[str, str]
) -> None:
    """encode gives the reference's ids on the whole corpus for all four bos/eos settings."""
    for (name, text), (bos, eos) in itertools.product(
        all_texts.items(), itertools.product((False, True), repeat=2)
    ):
        expected = reference_tokenizer.encode(text, bos=bos, eos=eos)
        assert tokenizer.encode(text, bos=bos, eos=eos) == expected, (name, bos, eos)


def test_decode_round_trips_the_corpus(tokenizer: Tokenizer, all_texts: dict[str, str]) -> None:
    """decode(encode(text)) is the text itself, special-token look-alikes included."""
    for name, text in all_texts.items():
        assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text, name


def test_decode_matches_reference_with_special_tokens(
    tokenizer: Tokenizer, reference_tokenizer: Any
) -> None:
    """decode renders special ids as their strings, as the reference does."""
    ids = [128000, 9906, 128009, 128255, 1070]
    assert tokenizer.decode(ids) == reference_tokenizer.decode(ids)


def test_million_char_mixed_text_matches_reference(
    tokenizer: Tokenizer, reference_tokenizer: Any
) -> None:
    """A 1,000,000-char mixed text (several 400k-char chunks) encodes like the reference."""
    unit = "The quick brown fox 1234567 数字 🙂 def f(x): return x\n\t  "
    text = (unit * (1_000_000 // len(unit) + 1))[:1_000_000]
    assert tokenizer.encode(text, bos=True, eos=True) == reference_tokenizer.encode(
        text, bos=True, eos=True
    )


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000,
        " " * 100_000,
        "x" * 30_000 + " " * 60_000 + "y" * 50_001 + "\n" * 25_001,
        "b" * 399_990 + "c" * 30_000,  # a run that crosses the 400k-char chunk boundary
    ],
    ids=["nonspace_100k", "spaces_100k", "alternating_long_runs", "run_across_chunks"],
)
def test_long_runs_match_reference(
    tokenizer: Tokenizer, reference_tokenizer: Any, text: str
) -> None:
    """Runs longer than 25,000 chars are cut where the reference cuts them, so ids agree."""
    assert tokenizer.encode(text, bos=False, eos=False) == reference_tokenizer.encode(
        text, bos=False, eos=False
    )


def test_split_long_runs_matches_reference_splitter(reference_tokenizer: Any) -> None:
    """split_long_runs yields exactly the reference's pieces (small limit to exercise the cuts)."""
    text = "aaaaaaa   bb\n\n\n\n\n\n\tcccccccccccccc d" + " " * 11
    expected = list(reference_tokenizer._split_whitespaces_or_nonwhitespaces(text, 3))
    assert list(split_long_runs(text, 3)) == expected


def test_special_tokens_match_reference(tokenizer: Tokenizer, reference_tokenizer: Any) -> None:
    """The 256 special tokens have the reference's names and ids, in id order."""
    assert tokenizer.special_tokens == reference_tokenizer.special_tokens
    assert list(tokenizer.special_tokens.values()) == list(range(128000, 128256))


def test_special_token_ids_by_hand(tokenizer: Tokenizer) -> None:
    """Named special tokens sit at Meta's published ids; the last is reserved_special_token_245."""
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {name: tokenizer.token_id(name) for name in expected} == expected


def test_id_attributes(tokenizer: Tokenizer) -> None:
    """vocab_size and the named ids equal Meta's Llama 3 values."""
    assert tokenizer.vocab_size == 128256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (128000, 128001, 128004)
    assert (tokenizer.eom_id, tokenizer.eot_id, tokenizer.python_tag_id) == (128008, 128009, 128010)
    assert (tokenizer.start_header_id, tokenizer.end_header_id) == (128006, 128007)
    assert tokenizer.stop_tokens == (128001, 128008, 128009)


def test_pattern_and_ranks_match_reference(tokenizer: Tokenizer, reference_tokenizer: Any) -> None:
    """pat_str and mergeable_ranks equal the reference's regex and its loaded BPE ranks."""
    assert tokenizer.pat_str == reference_tokenizer.pat_str
    assert tokenizer.mergeable_ranks == load_bpe_file(MODEL_FILE)


def test_sha256_is_digest_of_model_file(tokenizer: Tokenizer) -> None:
    """sha256 is the hex SHA-256 of the shipped tokenizer.model bytes."""
    assert tokenizer.sha256 == hashlib.sha256(MODEL_FILE.read_bytes()).hexdigest()
    assert tokenizer.name == "llama3"


def test_llama3_is_cached() -> None:
    """Tokenizer.llama3() returns the same object on repeated calls."""
    assert Tokenizer.llama3() is Tokenizer.llama3()


def test_allowed_special_all_makes_special_ids(tokenizer: Tokenizer) -> None:
    """With allowed_special="all", "<|eot_id|>" is the single id 128009."""
    assert tokenizer.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]


def test_special_strings_are_text_by_default(tokenizer: Tokenizer) -> None:
    """By default "<|eot_id|>" encodes as several ordinary tokens, none of them special."""
    ids = tokenizer.encode("<|eot_id|>", bos=False, eos=False)
    assert len(ids) > 1
    assert all(i < 128000 for i in ids)


def test_allowed_special_subset_matches_reference(
    tokenizer: Tokenizer, reference_tokenizer: Any
) -> None:
    """Allowing only "<|eot_id|>" makes it special while "<|eom_id|>" stays text, as in the reference."""
    text = "a<|eot_id|>b<|eom_id|>c"
    allowed = {"<|eot_id|>"}
    expected = reference_tokenizer.encode(text, bos=False, eos=False, allowed_special=allowed)
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special=allowed) == expected
    assert 128009 in expected and 128008 not in expected


def test_allowed_special_unknown_name_raises(tokenizer: Tokenizer) -> None:
    """An allowed_special name that is not a special token is rejected by name."""
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        tokenizer.encode("x", bos=False, eos=False, allowed_special={"<|nope|>"})


def test_encode_non_str_raises_type_error(tokenizer: Tokenizer) -> None:
    """encode of bytes raises TypeError naming the type."""
    with pytest.raises(TypeError, match="bytes"):
        tokenizer.encode(b"hello", bos=False, eos=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_id", [128256, -1])
def test_decode_out_of_range_raises(tokenizer: Tokenizer, bad_id: int) -> None:
    """decode of an id outside [0, 128256) raises ValueError naming the id."""
    with pytest.raises(ValueError, match=f"token id {bad_id} at position 1"):
        tokenizer.decode([9906, bad_id])


def test_missing_model_file_raises(tmp_path: Path) -> None:
    """A missing model file raises FileNotFoundError naming the path."""
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        Tokenizer(missing)


def test_malformed_model_file_names_line(tmp_path: Path) -> None:
    """A malformed line raises ValueError naming the file and line number."""
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nYg== one\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.model:2"):
        Tokenizer(bad)


def test_model_file_rank_gap_raises(tmp_path: Path) -> None:
    """Ranks that skip a value are rejected (they are token ids)."""
    gap = tmp_path / "gap.model"
    gap.write_text("YQ== 0\nYg== 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="gaps or duplicates"):
        Tokenizer(gap)


def test_small_model_file_places_specials_after_ranks(tmp_path: Path) -> None:
    """A 256-byte vocabulary gets its special tokens at ids 256..511 and round-trips text."""
    tiny = tmp_path / "bytes.model"
    tiny.write_text(
        "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)),
        encoding="utf-8",
    )
    tok = Tokenizer(tiny)
    assert (tok.vocab_size, tok.bos_id, tok.name) == (512, 256, "bytes.model")
    assert tok.encode("hé", bos=True, eos=False) == [256, 104, 0xC3, 0xA9]


def test_unknown_special_token_raises(tokenizer: Tokenizer) -> None:
    """token_id of an unknown string raises KeyError naming it."""
    with pytest.raises(KeyError, match="<\\|not_a_token\\|>"):
        tokenizer.token_id("<|not_a_token|>")


def test_token_bytes_concatenate_to_the_utf8_text(tokenizer: Tokenizer) -> None:
    """The bytes of each token, joined, are the UTF-8 text (a character split across tokens too)."""
    text = "naïve café 東京 🦙"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert b"".join(tokenizer.token_bytes(t) for t in ids) == text.encode()
    assert tokenizer.token_bytes(tokenizer.eot_id) == b"<|eot_id|>"
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.token_bytes(tokenizer.vocab_size)
