"""Guard shields: safety checks on a chat completion's input and output (§5.4.7 of "The Llama 3
Herd of Models", arXiv 2407.21783).

§5.4.7 pairs Llama 3 with Llama Guard 3, a Llama 3 8B fine-tuned to classify the last turn of a
conversation against a hazard taxonomy; it runs as an input shield (is the user's prompt safe?)
and as an output shield (is the model's answer safe?). A `Shield` is anything with
`async check(messages) -> Verdict` that assesses the last message: `LlamaGuardShield` runs a Llama
Guard checkpoint through a serving `Backend` (this package's engine or vLLM), `RuleShield` matches
regular expressions, and a user may plug in their own.

Llama Guard 3's prompt is reproduced from Meta's sources, which agree with one another:

- the chat template of `meta-llama/Llama-Guard-3-8B` on Hugging Face (`tokenizer_config.json`,
  kept as the test fixture `tests/data/llama_guard_3_8b_chat_template.json`);
- meta-llama/llama-stack `llama_stack/providers/inline/safety/llama_guard/llama_guard.py`
  (`PROMPT_TASK`, `SAFETY_CATEGORIES`, `PROMPT_CONVERSATION`, `PROMPT_INSTRUCTIONS`,
  `get_safety_categories`, `CANNED_RESPONSE_TEXT`);
- meta-llama/llama-recipes `src/llama_recipes/inference/prompt_format_utils.py`
  (`PROMPT_INSTRUCTIONS_2`, `LLAMA_GUARD_3_CATEGORY`);
- meta-llama/PurpleLlama `Llama-Guard3/8B/MODEL_CARD.md` (the 14 hazard categories).

The prompt is the content of one user turn, encoded with `llama_model.ChatFormat` and followed by
the assistant header, as llama-stack sends it to the model. The Hugging Face template renders the
same content but with a space before `<|begin_of_text|>` and without the "\\n\\n" after the final
assistant header (the model then writes it itself); tests/test_guard.py pins both differences.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from llama_model import ChatFormat, Message
from llama_serve.backend import Backend, NativeBackend
from llama_serve.params import RequestOutput, SamplingParams

__all__ = [
    "LLAMA_GUARD_CATEGORIES",
    "REFUSAL",
    "LlamaGuardShield",
    "RuleShield",
    "Shield",
    "Verdict",
    "llama_guard_prompt",
    "parse_llama_guard",
]

REFUSAL = "I can't answer that. Can I help with something else?"
"""What the server answers instead of a blocked completion: llama-stack's `CANNED_RESPONSE_TEXT`
(`llama_stack/providers/inline/safety/llama_guard/llama_guard.py`)."""

# The names as Llama Guard 3 reads them in its prompt: the chat template of
# meta-llama/Llama-Guard-3-8B ("S1: Violent Crimes.\nS2: Non-Violent Crimes.\n..."), llama-stack's
# SAFETY_CATEGORIES_TO_CODE_MAP and llama-recipes' LLAMA_GUARD_3_CATEGORY. The model card's table
# (PurpleLlama Llama-Guard3/8B/MODEL_CARD.md) gives three of them longer display names, "S3:
# Sex-Related Crimes", "S4: Child Sexual Exploitation" and "S11: Suicide & Self-Harm"; the prompt
# keeps the short ones, which the model was trained with.
LLAMA_GUARD_CATEGORIES: Mapping[str, str] = MappingProxyType(
    {
        "S1": "Violent Crimes",
        "S2": "Non-Violent Crimes",
        "S3": "Sex Crimes",
        "S4": "Child Exploitation",
        "S5": "Defamation",
        "S6": "Specialized Advice",
        "S7": "Privacy",
        "S8": "Intellectual Property",
        "S9": "Indiscriminate Weapons",
        "S10": "Hate",
        "S11": "Self-Harm",
        "S12": "Sexual Content",
        "S13": "Elections",
        "S14": "Code Interpreter Abuse",
    }
)
"""Llama Guard 3's 14 hazard categories, code -> name: the 13 hazards of the MLCommons taxonomy
and Code Interpreter Abuse (S14, for tool calls)."""

# The prompt's pieces, character for character as in the chat template of
# meta-llama/Llama-Guard-3-8B and in llama-stack's llama_guard.py (PROMPT_TASK, SAFETY_CATEGORIES,
# PROMPT_CONVERSATION, PROMPT_INSTRUCTIONS; llama-recipes' PROMPT_INSTRUCTIONS_2 is the same text).
# "according our" (sic) is Meta's wording, which the model was trained on.
_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our "
    "safety policy with the below categories."
)
_CATEGORIES = (
    "\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n"
)
_CONVERSATION = "\n<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n"
_INSTRUCTIONS = (
    "\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:"
    "\n - First line must read 'safe' or 'unsafe'."
    "\n - If unsafe, a second line must include a comma-separated list of violated categories."
)
# Llama Guard's two parties (the HF template: 'user' -> User, 'assistant' -> Agent; the prompt
# format page, llama.com/docs/model-cards-and-prompt-formats/llama-guard-3: "User or Agent; the
# former refers to the input and the latter to the output").
_PARTIES = {"user": "User", "assistant": "Agent"}
_CODE = re.compile(r"S[1-9][0-9]*")


@dataclass(frozen=True)
class Verdict:
    """A shield's assessment of the last message of a conversation."""

    safe: bool
    """True when the message may pass."""
    categories: tuple[str, ...] = ()
    """The violated categories' codes (e.g. ("S1", "S10")), empty when safe. An unsafe verdict
    with no category is one a shield could not attribute (for Llama Guard: an answer it could not
    parse, which fails closed)."""
    raw: str | None = None
    """The guard model's text, when a model gave the verdict."""

    def __post_init__(self) -> None:
        if self.safe and self.categories:
            raise ValueError(f"a safe verdict has no violated categories, got {self.categories}")


@runtime_checkable
class Shield(Protocol):
    """An input or output check: assesses the last message of a conversation.

    The server calls the same shield twice per completion: on the request's messages (the last
    one the user's: the input shield) and on them followed by the model's answer (the last one
    the assistant's: the output shield).
    """

    name: str
    """Names the shield in `/metrics` and in logs."""

    async def check(self, messages: Sequence[Message]) -> Verdict:
        """The verdict on `messages[-1]`; the earlier messages are its context."""
        ...


def llama_guard_prompt(
    messages: Sequence[Message],
    *,
    categories: Mapping[str, str] = LLAMA_GUARD_CATEGORIES,
    excluded: Collection[str] = (),
) -> str:
    """Llama Guard 3's prompt (the content of its one user turn) assessing `messages[-1]`.

    The last message must be the user's (the prompt asks about 'User') or the assistant's
    ('Agent'). The conversation lists user and assistant turns as "User: ..." and "Agent: ...",
    each stripped of surrounding whitespace as the HF template does; an assistant turn's tool
    calls are written after its content as the model wrote them (`ToolCall.render`), so code
    interpreter abuse (S14) is assessed. System prompts and tool results are not turns of
    Llama Guard's two-party conversation and are left out.

    `categories` (code -> name, each written "{code}: {name}.") is the policy; the codes in
    `excluded` are left out of it and the others keep their codes, as Meta's code does (the HF
    chat template of Llama Guard 3 11B-Vision skips `excluded_category_keys`, as the 1B card
    documents for 1B; llama-stack's `get_safety_categories` skips `excluded_categories`; neither
    renumbers). The model has learnt which code stands for which hazard, and its answer is read
    back by code. (llama-recipes' `build_custom_prompt` numbers a custom list 1..n afresh; for
    Llama Guard 3's own categories that would misname every code after an excluded one.)
    """
    enabled = _enabled_categories(categories, excluded)
    if not messages:
        raise ValueError("a Llama Guard prompt needs at least one message to assess; got none")
    last = messages[-1]
    if last.role not in _PARTIES:
        raise ValueError(
            f"Llama Guard assesses a user or an assistant message; the last message has role "
            f"{last.role!r}"
        )
    role = _PARTIES[last.role]
    turns = [f"{_PARTIES[m.role]}: {_turn_text(m).strip()}" for m in messages if m.role in _PARTIES]
    return (
        _TASK.format(role=role)
        + _CATEGORIES.format(
            categories="\n".join(f"{code}: {name}." for code, name in enabled.items())
        )
        + _CONVERSATION.format(conversation="\n\n".join(turns))
        + _INSTRUCTIONS.format(role=role)
    )


def parse_llama_guard(text: str) -> Verdict:
    """Read Llama Guard's answer: "safe", or "unsafe" and a line of comma-separated codes.

    Whitespace around the answer, its lines and its codes is ignored, as are letter case and
    repeated codes ("unsafe\\n s10, S1 " -> unsafe ("S10", "S1")). Anything else fails closed: an
    unsafe verdict with no category ("unsafe" alone, an unreadable category line, an empty or
    cut-off answer, "safe" followed by more lines, any other text).
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if [line.lower() for line in lines] == ["safe"]:
        return Verdict(safe=True, raw=text)
    if len(lines) == 2 and lines[0].lower() == "unsafe":
        codes = [code.strip().upper() for code in lines[1].split(",")]
        if all(_CODE.fullmatch(code) for code in codes):
            return Verdict(safe=False, categories=tuple(dict.fromkeys(codes)), raw=text)
    return Verdict(safe=False, raw=text)


class LlamaGuardShield:
    """A Llama Guard 3 checkpoint as a `Shield`, generating greedily through a `Backend`.

    `categories` is the policy (code -> name; default `LLAMA_GUARD_CATEGORIES`), `excluded` the
    codes switched off: they are left out of the prompt, and a verdict naming only excluded
    codes is safe (llama-stack's `get_shield_response` does the same; excluded codes are dropped
    from any other verdict). `max_tokens` bounds the answer ("unsafe\\nS1,S2,..." fits in 20).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        categories: Mapping[str, str] | None = None,
        excluded: Collection[str] = (),
        max_tokens: int = 20,
        name: str = "llama-guard",
    ) -> None:
        """Guard with the model `backend` serves; the arguments are checked here."""
        policy = LLAMA_GUARD_CATEGORIES if categories is None else categories
        _enabled_categories(policy, excluded)  # fail now, not on the first request
        self.categories: Mapping[str, str] = MappingProxyType(dict(policy))
        self.excluded: frozenset[str] = frozenset(excluded)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.backend = backend
        self.max_tokens = max_tokens
        self.name = name
        self.chat_format = ChatFormat(backend.tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        categories: Mapping[str, str] | None = None,
        excluded: Collection[str] = (),
        max_tokens: int = 20,
        name: str = "llama-guard",
        **engine_options: Any,
    ) -> LlamaGuardShield:
        """A shield over the checkpoint at `path`, served by this package's engine
        (`NativeBackend.from_pretrained(path, **engine_options)`, e.g. `dtype=`, `device=`)."""
        backend = NativeBackend.from_pretrained(path, **engine_options)
        return cls(
            backend, categories=categories, excluded=excluded, max_tokens=max_tokens, name=name
        )

    def prompt_token_ids(self, messages: Sequence[Message]) -> list[int]:
        """The tokens the guard model continues: `llama_guard_prompt` as one user turn, then the
        assistant header (`ChatFormat.encode_dialog`, Meta's `encode_dialog_prompt`)."""
        text = llama_guard_prompt(messages, categories=self.categories, excluded=self.excluded)
        return self.chat_format.encode_dialog([Message(role="user", content=text)]).tokens

    async def check(self, messages: Sequence[Message]) -> Verdict:
        """Llama Guard's verdict on `messages[-1]` (a user or an assistant message).

        Raises ValueError when the last message is neither a user's nor an assistant's or when
        the prompt and the answer do not fit the guard's context, and RuntimeError when the
        backend fails or aborts the generation (no verdict is invented).
        """
        tokens = self.prompt_token_ids(messages)
        limit = self.backend.max_model_len
        if len(tokens) + self.max_tokens > limit:
            raise ValueError(
                f"the guard prompt has {len(tokens)} tokens and may answer {self.max_tokens}, "
                f"more than the guard model's max_model_len {limit}; shorten the conversation "
                "or serve the guard with a longer max_model_len"
            )
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        final: RequestOutput | None = None
        async for output in self.backend.generate(tokens, params, f"guard-{uuid.uuid4().hex}"):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError(f"shield {self.name!r}: the guard model returned no output")
        answer = final.outputs[0]
        if answer.finish_reason not in ("stop", "length"):
            detail = f": {answer.error}" if answer.error else ""
            raise RuntimeError(
                f"shield {self.name!r}: the guard model's generation ended with "
                f"{answer.finish_reason!r}{detail}"
            )
        return self._without_excluded(parse_llama_guard(answer.text))

    async def close(self) -> None:
        """Release the backend (and its engine)."""
        await self.backend.close()

    def _without_excluded(self, verdict: Verdict) -> Verdict:
        if verdict.safe or not verdict.categories:
            return verdict
        kept = tuple(code for code in verdict.categories if code not in self.excluded)
        if not kept:
            return Verdict(safe=True, raw=verdict.raw)
        return Verdict(safe=False, categories=kept, raw=verdict.raw)


class RuleShield:
    """A `Shield` of regular expressions: category code -> patterns, matched case-insensitively
    (`re.search`) against the last message's text (its content, then its tool calls as
    written). A match makes the message unsafe with every category that matched, in `rules`
    order. For tests, and for deployments that block known strings without a guard model.
    """

    def __init__(self, rules: Mapping[str, Sequence[str]], *, name: str = "rules") -> None:
        """Compile `rules`; a bad pattern raises ValueError naming its category and itself."""
        if not rules:
            raise ValueError("RuleShield needs at least one category with patterns; got none")
        compiled: dict[str, list[re.Pattern[str]]] = {}
        for code, patterns in rules.items():
            if not isinstance(code, str) or not code:
                raise ValueError(f"rule categories must be non-empty strings, got {code!r}")
            if isinstance(patterns, str):
                raise ValueError(
                    f"rules[{code!r}] must be a list of patterns, got the string {patterns!r}; "
                    f"write [{patterns!r}]"
                )
            if not patterns:
                raise ValueError(f"rules[{code!r}] has no patterns; give at least one")
            compiled[code] = [_compile_rule(code, pattern) for pattern in patterns]
        self.rules: Mapping[str, tuple[re.Pattern[str], ...]] = MappingProxyType(
            {code: tuple(patterns) for code, patterns in compiled.items()}
        )
        self.name = name

    async def check(self, messages: Sequence[Message]) -> Verdict:
        """Unsafe with the categories whose patterns match `messages[-1]`, else safe."""
        if not messages:
            raise ValueError("a shield assesses the last message; got no messages")
        text = _turn_text(messages[-1])
        matched = tuple(
            code
            for code, patterns in self.rules.items()
            if any(pattern.search(text) for pattern in patterns)
        )
        return Verdict(safe=not matched, categories=matched)


def _compile_rule(code: str, pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(
            f"rules[{code!r}]: patterns must be non-empty strings (an empty pattern matches "
            f"every message), got {pattern!r}"
        )
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"rules[{code!r}]: bad regular expression {pattern!r}: {error}") from None


def _turn_text(message: Message) -> str:
    """A message as its author wrote it: the content, then each tool call (`ChatFormat`'s order)."""
    return message.content + "".join(call.render() for call in message.tool_calls)


def _enabled_categories(categories: Mapping[str, str], excluded: Collection[str]) -> dict[str, str]:
    """The policy without the excluded codes, in order; errors name what to change."""
    if isinstance(excluded, str):
        raise ValueError(f"excluded must be a collection of codes, got the string {excluded!r}")
    bad = [code for code in categories if not (isinstance(code, str) and _CODE.fullmatch(code))]
    if bad:
        raise ValueError(
            f"category codes are 'S' and a number, as Llama Guard writes them; got {bad}"
        )
    unknown = sorted(set(excluded) - set(categories))
    if unknown:
        raise ValueError(
            f"excluded categories {unknown} are not in the policy; its codes are {list(categories)}"
        )
    enabled = {code: name for code, name in categories.items() if code not in excluded}
    if not enabled:
        raise ValueError(
            "every category is excluded, so Llama Guard would have no policy to check; "
            "exclude fewer categories or do not use a guard"
        )
    return enabled
