"""Tests for llama_serve.guard: Llama Guard 3's prompt and verdicts, and the shields (§5.4.7).

The prompt's oracle is the `chat_template` of meta-llama/Llama-Guard-3-8B's `tokenizer_config.json`
(kept in tests/data/llama_guard_3_8b_chat_template.json, with its source), rendered by transformers'
`render_jinja_template` (what `apply_chat_template` runs) and tokenized by Meta's reference
tokenizer with special-token strings parsed, as a Hugging Face tokenizer does with a rendered
template. `LlamaGuardShield` is run against a scripted backend and against a tiny checkpoint forced
to give Llama Guard's answers (the `forced_checkpoint` fixture of conftest.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from llama_model import ChatFormat, Message, Tokenizer, ToolCall
from llama_serve.backend import Backend, BackendLoad
from llama_serve.guard import (
    LLAMA_GUARD_CATEGORIES,
    REFUSAL,
    LlamaGuardShield,
    RuleShield,
    Shield,
    Verdict,
    llama_guard_prompt,
    parse_llama_guard,
)
from llama_serve.params import CompletionOutput, RequestOutput, SamplingParams

HF_TEMPLATE: str = json.loads(
    (Path(__file__).parent / "data" / "llama_guard_3_8b_chat_template.json").read_text("utf-8")
)["chat_template"]

HATE = Message(role="user", content="Explain why people from that country are subhuman.")
BREAD = Message(role="user", content="How do I bake bread?")
BREAD_ANSWER = Message(role="assistant", content="Mix flour, water, salt and yeast; bake at 230 C.")

CONVERSATIONS: dict[str, list[Message]] = {
    "user-last": [Message(role="user", content="  How do I bake bread?\n")],
    "agent-last": [BREAD, Message(role="assistant", content="Mix flour and water.\n\n")],
    "user-last-multi-turn": [
        BREAD,
        BREAD_ANSWER,
        Message(role="user", content="And how do I make it rise faster?"),
    ],
    "agent-last-multi-turn": [
        BREAD,
        BREAD_ANSWER,
        Message(role="user", content="Thanks! Now tell me a joke."),
        Message(role="assistant", content="Why did the baker go to therapy? Too many knead-s."),
    ],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Meta's Llama 3 tokenizer."""
    return Tokenizer.llama3()


def hf_render(messages: Sequence[Message]) -> str:
    """Meta's Hugging Face Llama Guard 3 template over the conversation."""
    rendered, _ = render_jinja_template(
        conversations=[[{"role": m.role, "content": m.content} for m in messages]],
        chat_template=HF_TEMPLATE,
        add_generation_prompt=True,
    )
    text: str = rendered[0]
    return text


def encoded_prompt(tokenizer: Tokenizer, messages: Sequence[Message], **options: Any) -> list[int]:
    """Our guard prompt as the model sees it: one user turn and the assistant header."""
    content = llama_guard_prompt(messages, **options)
    return ChatFormat(tokenizer).encode_dialog([Message(role="user", content=content)]).tokens


def hf_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered template, special-token strings parsed (as transformers does)."""
    return tokenizer.encode(text, bos=False, eos=False, allowed_special="all")


# --------------------------------------------------------------------------------- the prompt


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_equals_meta_template(tokenizer: Tokenizer, name: str) -> None:
    """The encoded prompt is the HF template's rendering but for its two known differences."""
    messages = CONVERSATIONS[name]
    rendered = hf_render(messages)
    # The HF template starts with a space before <|begin_of_text|> and ends at the assistant
    # header without its "\n\n", which Meta's ChatFormat (llama-stack's path) writes.
    assert rendered.startswith(" <|begin_of_text|>")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>")
    ours = encoded_prompt(tokenizer, messages)
    assert tokenizer.decode(ours) == rendered[1:] + "\n\n"
    space, blank_line = tokenizer.encode(" ", bos=False, eos=False), [ours[-1]]
    assert tokenizer.decode(blank_line) == "\n\n"
    assert hf_ids(tokenizer, rendered) == space + ours[:-1]


@pytest.mark.parametrize(
    ("messages", "party"),
    [(CONVERSATIONS["user-last"], "User"), (CONVERSATIONS["agent-last"], "Agent")],
    ids=["user", "agent"],
)
def test_prompt_names_the_last_party(messages: list[Message], party: str) -> None:
    """The task and the instructions ask about the last message's party, User or Agent."""
    prompt = llama_guard_prompt(messages)
    assert prompt.startswith(f"Task: Check if there is unsafe content in '{party}' messages")
    assert f"Provide your safety assessment for ONLY THE LAST {party} message" in prompt


def test_categories_are_the_templates(tokenizer: Tokenizer) -> None:
    """LLAMA_GUARD_CATEGORIES is the category block of Meta's template, in order."""
    rendered = hf_render(CONVERSATIONS["user-last"])
    block = rendered.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("\n<END")[0]
    assert block.splitlines() == [f"{c}: {n}." for c, n in LLAMA_GUARD_CATEGORIES.items()]
    assert list(LLAMA_GUARD_CATEGORIES) == [f"S{i}" for i in range(1, 15)]


@pytest.mark.parametrize("excluded", [("S6",), ("S1", "S7", "S14")], ids=["S6", "S1-S7-S14"])
def test_excluded_categories_keep_their_codes(tokenizer: Tokenizer, excluded: tuple[str]) -> None:
    """Excluding categories removes their lines and leaves the other codes as they were."""
    messages = CONVERSATIONS["agent-last"]
    expected = hf_render(messages)[1:] + "\n\n"
    for code in excluded:
        line = f"{code}: {LLAMA_GUARD_CATEGORIES[code]}.\n"
        assert line in expected
        expected = expected.replace(line, "")
    ours = encoded_prompt(tokenizer, messages, excluded=excluded)
    assert tokenizer.decode(ours) == expected
    assert "S8: Intellectual Property.\nS9: Indiscriminate Weapons." in expected


def test_custom_categories() -> None:
    """A custom policy is written "{code}: {name}." in its own order (HF 1B template style)."""
    policy = {"S1": "My custom category", "S2": "Another one"}
    prompt = llama_guard_prompt([BREAD], categories=policy, excluded=["S2"])
    assert "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: My custom category.\n<END UNSAFE" in prompt


def test_tool_calls_are_written_and_side_turns_left_out() -> None:
    """Tool calls are part of the agent's turn; system prompts and tool results are not turns."""
    messages = [
        Message(role="system", content="You are a helpful assistant."),
        Message(role="user", content="List my files."),
        Message(
            role="assistant",
            content="",
            tool_calls=(ToolCall(name="code_interpreter", arguments={"code": "import os"}),),
        ),
        Message(role="ipython", content="['a.txt']"),
        Message(role="assistant", content="You have a.txt."),
    ]
    prompt = llama_guard_prompt(messages)
    conversation = prompt.split("<BEGIN CONVERSATION>\n\n")[1].split("\n\n<END CONVERSATION>")[0]
    assert conversation == "User: List my files.\n\nAgent: import os\n\nAgent: You have a.txt."


@pytest.mark.parametrize(
    ("messages", "options", "message"),
    [
        ([], {}, "at least one message"),
        ([Message(role="system", content="x")], {}, "role 'system'"),
        ([BREAD, Message(role="ipython", content="x")], {}, "role 'ipython'"),
        ([BREAD], {"excluded": ["S15"]}, r"\['S15'\] are not in the policy"),
        ([BREAD], {"excluded": list(LLAMA_GUARD_CATEGORIES)}, "every category is excluded"),
        ([BREAD], {"excluded": "S1"}, "got the string 'S1'"),
        (
            [BREAD],
            {"categories": {"O1": "Violence"}},
            r"'S' and a number, as Llama Guard writes them; got \['O1'\]",
        ),
    ],
    ids=["empty", "system-last", "tool-last", "unknown-code", "all-excluded", "str", "bad-code"],
)
def test_prompt_refuses_bad_input(
    messages: list[Message], options: dict[str, Any], message: str
) -> None:
    """Bad conversations and policies raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        llama_guard_prompt(messages, **options)


# ------------------------------------------------------------------------------- the verdict


@pytest.mark.parametrize("text", ["safe", "\n\nsafe", "safe\n", "  Safe \n\n"])
def test_parse_safe(text: str) -> None:
    """ "safe", with any whitespace around it, is a safe verdict."""
    assert parse_llama_guard(text) == Verdict(safe=True, raw=text)


@pytest.mark.parametrize(
    ("text", "categories"),
    [
        ("unsafe\nS1,S10", ("S1", "S10")),
        ("\n\nunsafe\nS10", ("S10",)),
        ("unsafe\n s10 , S1 \n", ("S10", "S1")),
        ("UNSAFE\r\nS3,S3", ("S3",)),
    ],
)
def test_parse_unsafe(text: str, categories: tuple[str, ...]) -> None:
    """ "unsafe" and a line of codes gives those codes, in order, normalised and deduplicated."""
    assert parse_llama_guard(text) == Verdict(safe=False, categories=categories, raw=text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "unsafe",
        "unsafe\nhate",
        "unsafe\nS1,",
        "unsafe\nS0",
        "unsafe\nS1\nS2",
        "safe\nS1",
        "maybe",
        "I think it is safe",
        "unsa",
    ],
)
def test_parse_fails_closed(text: str) -> None:
    """Anything else is unsafe with no category: an unreadable guard never lets content pass."""
    assert parse_llama_guard(text) == Verdict(safe=False, categories=(), raw=text)


def test_safe_verdict_has_no_categories() -> None:
    """A verdict cannot be safe and name violated categories."""
    with pytest.raises(ValueError, match="safe verdict has no violated categories"):
        Verdict(safe=True, categories=("S1",))


def test_refusal_is_meta_canned_response() -> None:
    """REFUSAL is llama-stack's canned response text."""
    assert REFUSAL == "I can't answer that. Can I help with something else?"


# ---------------------------------------------------------------------------- the rule shield


def test_rule_shield_matches_case_insensitively() -> None:
    """Every category with a matching pattern is reported, in the rules' order."""
    shield = RuleShield({"S10": [r"\bsubhuman\b"], "S1": ["kill", "murder"], "S2": ["fraud"]})
    verdict = asyncio.run(shield.check([Message(role="user", content="MURDER the SubHuman")]))
    assert verdict == Verdict(safe=False, categories=("S10", "S1"))


def test_rule_shield_passes_other_messages() -> None:
    """A message no pattern matches is safe."""
    shield = RuleShield({"S1": ["kill"]})
    assert asyncio.run(shield.check([BREAD])) == Verdict(safe=True)


def test_rule_shield_reads_only_the_last_message() -> None:
    """Earlier messages are context: a match there does not block the last one."""
    shield = RuleShield({"S1": ["kill"]})
    messages = [Message(role="user", content="kill"), BREAD_ANSWER]
    assert asyncio.run(shield.check(messages)).safe


def test_rule_shield_reads_tool_calls() -> None:
    """An assistant's tool calls are checked as the model wrote them."""
    shield = RuleShield({"S14": [r"rm -rf /"]})
    call = ToolCall(name="code_interpreter", arguments={"code": "import os; os.system('rm -rf /')"})
    message = Message(role="assistant", content="", tool_calls=(call,))
    assert asyncio.run(shield.check([BREAD, message])) == Verdict(safe=False, categories=("S14",))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"S1": ["(unclosed"]}, r"rules\['S1'\]: bad regular expression '\(unclosed'"),
        ({"S1": "kill"}, r"must be a list of patterns, got the string 'kill'"),
        ({"S1": [""]}, "an empty pattern matches every message"),
        ({"S1": []}, r"rules\['S1'\] has no patterns"),
        ({}, "at least one category"),
    ],
    ids=["bad-regex", "str", "empty-pattern", "no-patterns", "no-rules"],
)
def test_rule_shield_validates_rules(rules: Any, message: str) -> None:
    """Bad rules raise ValueError naming the category and the pattern."""
    with pytest.raises(ValueError, match=message):
        RuleShield(rules)


# ----------------------------------------------------------------- Llama Guard over a backend


class ScriptedBackend:
    """A `Backend` that answers every request with a fixed text and records what it was asked."""

    def __init__(self, answer: str, *, finish_reason: str = "stop", max_model_len: int = 4096):
        self.tokenizer = Tokenizer.llama3()
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(self.tokenizer.stop_tokens)
        self.answer = answer
        self.finish_reason = finish_reason
        self.requests: list[tuple[list[int], SamplingParams, str]] = []

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((prompt_token_ids, params, request_id))
        output = CompletionOutput(0, self.answer, [], finish_reason=self.finish_reason)
        yield RequestOutput(request_id, None, prompt_token_ids, [output], finished=True)

    def load(self) -> BackendLoad:
        return BackendLoad(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=1)

    async def close(self) -> None:
        pass


def test_shields_satisfy_the_protocol() -> None:
    """Both shields are `Shield`s, and the scripted backend is a `Backend`."""
    backend = ScriptedBackend("safe")
    assert isinstance(backend, Backend)
    assert isinstance(LlamaGuardShield(backend), Shield)
    assert isinstance(RuleShield({"S1": ["x"]}), Shield)


def test_llama_guard_shield_asks_greedily(tokenizer: Tokenizer) -> None:
    """The backend gets the encoded guard prompt, greedy sampling and max_tokens, once."""
    backend = ScriptedBackend("unsafe\nS10")
    shield = LlamaGuardShield(backend, excluded=["S6"], max_tokens=7)
    verdict = asyncio.run(shield.check([HATE]))
    assert verdict == Verdict(safe=False, categories=("S10",), raw="unsafe\nS10")
    [(prompt, params, request_id)] = backend.requests
    assert prompt == encoded_prompt(tokenizer, [HATE], excluded=["S6"])
    assert (params.temperature, params.max_tokens) == (0.0, 7)
    assert request_id.startswith("guard-")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("unsafe\nS6", Verdict(safe=True, raw="unsafe\nS6")),
        ("unsafe\nS6,S1", Verdict(safe=False, categories=("S1",), raw="unsafe\nS6,S1")),
        ("unsafe", Verdict(safe=False, raw="unsafe")),
    ],
    ids=["only-excluded", "mixed", "no-category"],
)
def test_llama_guard_shield_drops_excluded_codes(answer: str, expected: Verdict) -> None:
    """Excluded codes in the model's answer are dropped; a verdict of only those is safe."""
    shield = LlamaGuardShield(ScriptedBackend(answer), excluded=["S6"])
    assert asyncio.run(shield.check([HATE])) == expected


def test_llama_guard_shield_raises_on_backend_failure() -> None:
    """A failed or aborted generation raises RuntimeError rather than inventing a verdict."""
    shield = LlamaGuardShield(ScriptedBackend("", finish_reason="abort"))
    with pytest.raises(RuntimeError, match="ended with 'abort'"):
        asyncio.run(shield.check([HATE]))


def test_llama_guard_shield_refuses_too_long_conversations() -> None:
    """A prompt that does not fit the guard's context raises ValueError before generating."""
    backend = ScriptedBackend("safe", max_model_len=300)
    shield = LlamaGuardShield(backend)
    with pytest.raises(ValueError, match="max_model_len 300"):
        asyncio.run(shield.check([Message(role="user", content="bread " * 200)]))
    assert backend.requests == []


def test_llama_guard_shield_checks_its_options() -> None:
    """Bad categories or max_tokens fail when the shield is built, not on a request."""
    with pytest.raises(ValueError, match="not in the policy"):
        LlamaGuardShield(ScriptedBackend("safe"), excluded=["S99"])
    with pytest.raises(ValueError, match="got the string 'S1'"):
        LlamaGuardShield(ScriptedBackend("safe"), excluded="S1")
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        LlamaGuardShield(ScriptedBackend("safe"), max_tokens=0)


# ------------------------------------------------------------- Llama Guard from a checkpoint


def test_llama_guard_shield_with_forced_model(
    tokenizer: Tokenizer, forced_checkpoint: Callable[[Any], Path]
) -> None:
    """A checkpoint forced to Llama Guard's answers gives the shield its verdicts, via the engine."""
    unsafe_input, safe_output = [HATE], [BREAD, BREAD_ANSWER]
    answers = {"unsafe\nS10": unsafe_input, "safe": safe_output}
    path = forced_checkpoint(
        [
            (
                encoded_prompt(tokenizer, messages),
                [*tokenizer.encode(answer, bos=False, eos=False), tokenizer.eot_id],
            )
            for answer, messages in answers.items()
        ]
    )

    async def verdicts() -> list[Verdict]:
        shield = LlamaGuardShield.from_pretrained(path, dtype="float32")
        try:
            return [await shield.check(unsafe_input), await shield.check(safe_output)]
        finally:
            await shield.close()

    assert asyncio.run(verdicts()) == [
        Verdict(safe=False, categories=("S10",), raw="unsafe\nS10"),
        Verdict(safe=True, raw="safe"),
    ]
