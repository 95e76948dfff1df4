"""Rows and their encodings: validation with counted drops, the ranked forms, prompt + response
equal to the whole dialog's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_align.data import (
    DataError,
    DataReport,
    PreferenceRow,
    PromptRow,
    SftRow,
    encode_preference,
    encode_prompt,
    encode_ranked,
    encode_response,
    read_rows,
    write_rows,
)
from llama_model import ChatFormat, Message, Tokenizer


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.llama3())


def _user(text: str) -> Message:
    return Message(role="user", content=text)


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def test_every_bad_line_is_counted_under_its_reason_with_its_place(tmp_path: Path) -> None:
    """Not JSON, not an object, and a failed check each count once, with file:line."""
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
        "[1, 2]",
        "{oops",
        "",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [], "extra": 1}),
    ]
    path.write_text("\n".join(lines) + "\n")
    rows, report = read_rows(path, SftRow)
    assert len(rows) == 1 and report.used == 1
    assert report.dropped["not an object"] == 1
    assert report.dropped["not JSON"] == 1
    assert sum(report.dropped.values()) == 4
    assert report.examples["not JSON"] == [
        f"{path}:3: Expecting property name enclosed in double quotes"
    ]
    assert "used 1 rows; dropped 4" in report.summary()


def test_no_usable_row_is_an_error_that_shows_the_report(tmp_path: Path) -> None:
    """A file with only bad rows raises DataError carrying the drop summary."""
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n")
    with pytest.raises(DataError, match=r"(?s)no usable SftRow.*not JSON: 1"):
        read_rows(path, SftRow)
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl", SftRow)


def test_preference_forms_and_their_ranks() -> None:
    """chosen/rejected rank 1/2, edited 0; ranked responses as given; mixed forms refused."""
    prompt = [_user("q")]
    row = PreferenceRow(
        prompt=prompt,
        chosen=[_assistant("c")],
        rejected=[_assistant("r")],
        edited=[_assistant("e")],
    )
    assert [(r[0].content, rank) for r, rank in row.ranked()] == [("e", 0), ("c", 1), ("r", 2)]
    ranked = PreferenceRow.model_validate(
        {
            "prompt": [{"role": "user", "content": "q"}],
            "responses": [
                {"messages": [{"role": "assistant", "content": "x"}], "rank": 1},
                {"messages": [{"role": "assistant", "content": "y"}], "rank": 0},
            ],
        }
    )
    assert [rank for _, rank in ranked.ranked()] == [1, 0]
    with pytest.raises(ValueError, match="not both"):
        PreferenceRow(
            prompt=prompt,
            chosen=[_assistant("c")],
            rejected=[_assistant("r")],
            responses=ranked.responses,
        )
    with pytest.raises(ValueError, match="rejected is missing"):
        PreferenceRow(prompt=prompt, chosen=[_assistant("c")])
    with pytest.raises(ValueError, match="same rank"):
        PreferenceRow.model_validate(
            {
                "prompt": [{"role": "user", "content": "q"}],
                "responses": [
                    {"messages": [{"role": "assistant", "content": "x"}], "rank": 0},
                    {"messages": [{"role": "assistant", "content": "y"}], "rank": 0},
                ],
            }
        )
    with pytest.raises(ValueError, match="last message is the assistant's"):
        PromptRow(messages=[_user("q"), _assistant("a")])


def test_prompt_plus_response_is_the_whole_dialog(chat: ChatFormat) -> None:
    """encode_prompt + encode_response equals encode_dialog of the whole conversation, masks too,
    for a response of several messages (a tool call, its result, the answer)."""
    prompt = [Message(role="system", content="Be brief."), _user("Weather?")]
    response = [
        Message(
            role="assistant",
            content="",
            tool_calls=({"name": "weather", "arguments": {"city": "Oslo"}},),
            end_of_message=True,
        ),
        Message(role="tool", content="rain"),
        _assistant("It rains."),
    ]
    whole = chat.encode_dialog([*prompt, *response], add_generation_prompt=False)
    head, tail = encode_prompt(chat, prompt), encode_response(chat, prompt, response)
    assert head.tokens + tail.tokens == whole.tokens
    assert head.assistant_mask + tail.assistant_mask == whole.assistant_mask
    assert head.format_mask + tail.format_mask == whole.format_mask
    assert not any(head.assistant_mask)


def test_an_edited_row_gives_three_pairs_and_one_ranked_example(chat: ChatFormat) -> None:
    """edited > chosen > rejected: DPO gets the 3 ordered pairs; the reward model one row."""
    row = PreferenceRow(
        prompt=[_user("q")],
        chosen=[_assistant("c")],
        rejected=[_assistant("r")],
        edited=[_assistant("e")],
    )
    pairs = encode_preference(chat, [row], max_tokens=100)
    texts = [
        (chat.tokenizer.decode(p.chosen.tokens[:-1]), chat.tokenizer.decode(p.rejected.tokens[:-1]))
        for p in pairs
    ]
    assert texts == [("e", "c"), ("e", "r"), ("c", "r")]
    (ranked,) = encode_ranked(chat, [row], max_tokens=100)
    assert ranked.ranks == (0, 1, 2) and len(ranked.responses) == 3


def test_too_long_examples_are_counted(chat: ChatFormat) -> None:
    """An example over max_tokens is dropped under "too long", naming its length."""
    report = DataReport()
    row = PreferenceRow(
        prompt=[_user("q " * 50)], chosen=[_assistant("c")], rejected=[_assistant("r")]
    )
    assert encode_ranked(chat, [row], max_tokens=20, report=report) == []
    assert report.dropped["too long"] == 1 and "> max_tokens 20" in report.examples["too long"][0]


def test_rows_round_trip_through_jsonl(tmp_path: Path) -> None:
    """write_rows then read_rows gives the same rows (tool calls included)."""
    rows = [
        SftRow(
            messages=[
                _user("q"),
                Message(
                    role="assistant", content="", tool_calls=({"name": "f", "arguments": {"x": 1}},)
                ),
            ]
        ),
        SftRow(messages=[_user("q2"), _assistant("a2")]),
    ]
    back, report = read_rows(write_rows(tmp_path / "r.jsonl", rows), SftRow)
    assert back == rows and report.used == 2 and not report.dropped
