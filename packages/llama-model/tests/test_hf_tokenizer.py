"""Tests for llama_model._hf_tokenizer and CHAT_TEMPLATE, against Hugging Face tokenizers/transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import llama_models
import pytest
import tokenizers
import transformers
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from llama_model._hf_tokenizer import bytes_to_unicode, tiktoken_to_hf_bpe, write_hf_tokenizer
from llama_model.chat import ChatFormat, Message, ToolCall
from llama_model.tokenizer import Tokenizer

MODEL_FILE = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"

SEARCH = ToolCall(name="wolfram_alpha", arguments={"query": "integrate x^2"})
CODE = ToolCall(name="code_interpreter", arguments={"code": "import os\nprint(os.getcwd())"})
CUSTOM = ToolCall(
    name="book_flight",
    arguments={"to": "São Paulo", "from": "<NYC> & co", "seats": 2, "ok": True, "z": None},
)

# Ordinary dialogs: no special-token strings, no content starting with a line break, at most one
# tool call per message and empty content beside it (see the CHAT_TEMPLATE limitation note).
HF_DIALOGS: dict[str, list[Message]] = {
    "system_user": [
        Message(role="system", content="You are a helpful assistant."),
        Message(role="user", content="Explain BPE in one sentence."),
    ],
    "multi_turn_code": [
        Message(role="user", content="Write a Python function."),
        Message(role="assistant", content="def f(x):\n    return x * 2\n"),
        Message(role="user", content="  And in JS?  "),
        Message(role="assistant", content="const f = (x) => x * 2;"),
    ],
    "cjk_emoji": [
        Message(role="system", content="请用中文回答。"),
        Message(role="user", content="こんにちは 🤦🏻‍♂️ 안녕하세요 👨‍👩‍👧‍👦"),
        Message(role="assistant", content="你好！😊 مرحبا"),
    ],
    "builtin_tool_eom": [
        Message(role="user", content="What is the integral of x^2?"),
        Message(role="assistant", content="", tool_calls=(SEARCH,), end_of_message=True),
        Message(role="ipython", content='{"result": "x^3/3"}'),
        Message(role="assistant", content="It is x^3/3 + C."),
    ],
    "code_interpreter_eom": [
        Message(role="user", content="Where am I?"),
        Message(role="assistant", content="", tool_calls=(CODE,), end_of_message=True),
        Message(role="tool", content="/home/user"),
    ],
    "custom_json_call": [
        Message(role="system", content="Tools: book_flight"),
        Message(role="user", content="Book 2 seats to São Paulo."),
        Message(role="assistant", content="", tool_calls=(CUSTOM,)),
        Message(role="ipython", content="booked"),
        Message(role="assistant", content="Done: two seats are booked."),
    ],
}


@pytest.fixture(scope="session")
def hf_written(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> list[Path]:
    """The paths write_hf_tokenizer returns for one export (written once per session)."""
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    return write_hf_tokenizer(tokenizer, directory, model_max_length=131072)


@pytest.fixture(scope="session")
def hf_dir(hf_written: list[Path]) -> Path:
    """The exported Hugging Face tokenizer directory."""
    return hf_written[0].parent


@pytest.fixture(scope="session")
def fast(hf_dir: Path) -> tokenizers.Tokenizer:
    """The exported tokenizer.json loaded by the `tokenizers` library."""
    return tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def auto(hf_dir: Path) -> Any:
    """The exported directory loaded by `transformers.AutoTokenizer`."""
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_writes_the_three_files(hf_written: list[Path], hf_dir: Path) -> None:
    """write_hf_tokenizer returns the paths of the three files it writes, and nothing else is left."""
    assert [p.name for p in hf_written] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    assert sorted(hf_dir.iterdir()) == sorted(hf_written)


def test_bytes_to_unicode_matches_transformers() -> None:
    """The byte-level table equals transformers' GPT-2 bytes_to_unicode."""
    assert bytes_to_unicode() == hf_bytes_to_unicode()


def test_tiny_merges_by_hand() -> None:
    """Each multi-byte token yields every split into known tokens, in the merged token's rank order."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"ab": 256, b" a": 257, b"abc": 258, b"bc": 259, b" abc": 260}
    vocab, merges = tiktoken_to_hf_bpe(ranks)
    assert vocab["Ġabc"] == 260 and vocab["a"] == ord("a")
    assert merges == [
        ["a", "b"],
        ["Ġ", "a"],
        ["a", "bc"],  # both splits of "abc"; "a" (97) outranks "ab" (256), so it goes first
        ["ab", "c"],
        ["b", "c"],
        ["Ġ", "abc"],
        ["Ġa", "bc"],
    ]


def test_vocab_and_merges_match_transformers_converter(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vocabulary and merge list equal transformers' TikTokenConverter on the real Llama 3 file."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file directly, cache nothing
    expected_vocab, expected_merges = TikTokenConverter().extract_vocab_merges_from_model(
        str(MODEL_FILE)
    )
    vocab, merges = tiktoken_to_hf_bpe(tokenizer.mergeable_ranks)
    assert vocab == expected_vocab
    assert [tuple(m) for m in merges] == expected_merges


def test_tokenizers_ids_match_ours(
    fast: tokenizers.Tokenizer, tokenizer: Tokenizer, plain_texts: dict[str, str]
) -> None:
    """tokenizers' ids equal ours on the plain corpus, with and without the BOS."""
    for name, text in plain_texts.items():
        assert fast.encode(text).ids == tokenizer.encode(text, bos=True, eos=False), name
        assert fast.encode(text, add_special_tokens=False).ids == tokenizer.encode(
            text, bos=False, eos=False
        ), name


def test_auto_tokenizer_ids_match_ours(
    auto: Any, tokenizer: Tokenizer, plain_texts: dict[str, str]
) -> None:
    """AutoTokenizer's input_ids equal ours (with BOS) on the plain corpus."""
    for name, text in plain_texts.items():
        assert auto(text)["input_ids"] == tokenizer.encode(text, bos=True, eos=False), name


def test_auto_tokenizer_decodes_to_the_text(
    auto: Any, tokenizer: Tokenizer, plain_texts: dict[str, str]
) -> None:
    """AutoTokenizer decodes our ids to the original text (no whitespace clean-up)."""
    for name, text in plain_texts.items():
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert auto.decode(ids) == text, name


def test_post_processor_adds_only_bos(auto: Any) -> None:
    """The post-processor prepends <|begin_of_text|> and appends nothing."""
    assert auto("Hello")["input_ids"] == [128000, 9906]
    assert auto("Hello", add_special_tokens=False)["input_ids"] == [9906]


def test_hf_parses_special_token_strings_unlike_ours(
    fast: tokenizers.Tokenizer, tokenizer: Tokenizer
) -> None:
    """Known difference: Hugging Face makes "<|eot_id|>" in text the special id; ours keeps it text."""
    ids = fast.encode("hi<|eot_id|>", add_special_tokens=False).ids
    assert ids == [*tokenizer.encode("hi", bos=False, eos=False), 128009]
    assert tokenizer.encode("hi<|eot_id|>", bos=False, eos=False) != ids


def test_special_tokens_and_config(auto: Any, fast: tokenizers.Tokenizer) -> None:
    """All 256 specials are added special tokens; BOS, EOS (eot), pad and length come from the config."""
    added = fast.get_added_tokens_decoder()
    assert sorted(added) == list(range(128000, 128256))
    assert all(token.special for token in added.values())
    assert fast.get_vocab_size() == 128256
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (128000, 128009, 128004)
    assert auto.model_max_length == 131072


def test_config_file_contents(hf_dir: Path) -> None:
    """tokenizer_config.json names the fast tokenizer class and turns whitespace clean-up off."""
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["eos_token"] == "<|eot_id|>"


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("name", list(HF_DIALOGS))
def test_chat_template_ids_match_encode_dialog(
    auto: Any, chat_format: ChatFormat, name: str, add_generation_prompt: bool
) -> None:
    """apply_chat_template's ids equal ChatFormat.encode_dialog for ordinary dialogs."""
    messages = HF_DIALOGS[name]
    ids = auto.apply_chat_template(
        [m.to_hf_dict() for m in messages],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
    )["input_ids"]
    expected = chat_format.encode_dialog(messages, add_generation_prompt=add_generation_prompt)
    assert ids == expected.tokens


@pytest.mark.parametrize("name", list(HF_DIALOGS))
def test_chat_template_assistant_mask_matches(
    auto: Any, chat_format: ChatFormat, name: str
) -> None:
    """return_assistant_tokens_mask marks exactly EncodedDialog.assistant_mask."""
    messages = HF_DIALOGS[name]
    out = auto.apply_chat_template(
        [m.to_hf_dict() for m in messages],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
    )
    expected = chat_format.encode_dialog(messages, add_generation_prompt=False).assistant_mask
    assert [bool(m) for m in out["assistant_masks"]] == expected


def test_chat_template_writes_custom_calls_as_json_dumps(auto: Any) -> None:
    """A custom call renders exactly json.dumps: key order kept, ASCII escapes, no HTML escaping."""
    arguments = {"zeta": "é<&>'", "alpha": [1, 2.5, None, True], "emoji": "🙂"}
    message = Message(
        role="assistant", content="", tool_calls=(ToolCall(name="f", arguments=arguments),)
    )
    text = auto.apply_chat_template([message.to_hf_dict()], tokenize=False)
    expected = json.dumps({"type": "function", "name": "f", "parameters": arguments})
    assert text == (
        f"<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n{expected}<|eot_id|>"
    )


def test_chat_template_limitation_special_strings(auto: Any, chat_format: ChatFormat) -> None:
    """Known limitation: content holding "<|eot_id|>" is parsed as the special token by the template path."""
    messages = [Message(role="user", content="say <|eot_id|>")]
    ids = auto.apply_chat_template(
        [m.to_hf_dict() for m in messages], tokenize=True, return_dict=True
    )["input_ids"]
    assert ids.count(128009) == 2
    assert chat_format.encode_dialog(messages).tokens.count(128009) == 1


def test_chat_template_requires_builtin_query(auto: Any) -> None:
    """A built-in call without "query" makes the template raise, naming the tool."""
    bad = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "photogen", "arguments": {}}}],
    }
    with pytest.raises(jinja2.TemplateError, match="photogen"):
        auto.apply_chat_template([bad], tokenize=False)


def test_bad_eos_token_rejected(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """An eos_token that is not a special token is rejected by name, and nothing is written."""
    with pytest.raises(ValueError, match="<eos>"):
        write_hf_tokenizer(tokenizer, tmp_path, model_max_length=10, eos_token="<eos>")
    assert list(tmp_path.iterdir()) == []


def test_bad_model_max_length_rejected(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A non-positive model_max_length is rejected, naming the value."""
    with pytest.raises(ValueError, match="-1"):
        write_hf_tokenizer(tokenizer, tmp_path, model_max_length=-1)
