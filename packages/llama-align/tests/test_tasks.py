"""The stdlib-docstring task (`llama_align.tasks`): deterministic, split by function in every
role, chosen != rejected, answers that are the functions' own docstrings and bounded, rows that
survive `write_rows` -> `read_rows`, and the skip rules on a module made for the test."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from llama_align.data import (
    DataReport,
    PreferenceRow,
    PromptRow,
    SftRow,
    encode_preference,
    encode_ranked,
    encode_sft,
    read_rows,
)
from llama_align.tasks import QUESTION, DocFunction, DocstringTask, TaskSplits
from llama_model import ChatFormat, Message, Tokenizer

_NAME_IN_QUESTION = re.compile(r"`([^`]+)`")


@pytest.fixture(scope="module")
def splits() -> TaskSplits:
    """The default task, seed 0."""
    return DocstringTask().build(seed=0)


def _asked(prompt: list[Message]) -> str:
    """The function a prompt asks about (read back from the question text)."""
    match = _NAME_IN_QUESTION.search(prompt[-1].content)
    assert match is not None, prompt
    return match.group(1)


def _owners(splits: TaskSplits) -> dict[str, str]:
    """Answer text -> the function whose docstring it is."""
    functions = [*splits.train_functions, *splits.heldout_functions]
    owners = {f.answer: f.name for f in functions}
    assert len(owners) == len(functions), "two functions share an answer"
    return owners


def _roles(rows_prompts: list[list[Message]], responses: list[list[Message]]) -> set[str]:
    return {_asked(p) for p in rows_prompts} | {r[0].content for r in responses}


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w*+\-/%&|^~<>=@]+", " ", text.lower()).split())


def test_same_seed_gives_the_same_rows() -> None:
    """Two builds with one seed give identical rows and splits."""
    a, b = DocstringTask().build(seed=3), DocstringTask().build(seed=3)
    assert a.sft_train == b.sft_train
    assert a.preference_train == b.preference_train
    assert a.preference_heldout == b.preference_heldout
    assert a.prompts_train == b.prompts_train
    assert a.prompts_heldout == b.prompts_heldout


def test_different_seed_gives_a_different_split() -> None:
    """Another seed holds out other functions and draws other rejected answers."""
    a, b = DocstringTask().build(seed=0), DocstringTask().build(seed=1)
    assert {f.name for f in a.heldout_functions} != {f.name for f in b.heldout_functions}
    assert a.preference_train != b.preference_train


@pytest.mark.parametrize(("same_module_fraction", "negatives"), [(0.0, 1), (1.0, 1), (0.5, 4)])
def test_heldout_functions_appear_in_no_training_row(
    same_module_fraction: float, negatives: int
) -> None:
    """No held-out function is asked about, chosen or rejected in any training row, and back."""
    splits = DocstringTask().build(
        seed=0, same_module_fraction=same_module_fraction, negatives=negatives
    )
    owners = _owners(splits)
    train_names = {f.name for f in splits.train_functions}
    heldout_names = {f.name for f in splits.heldout_functions}
    assert not train_names & heldout_names

    def names(rows: list[PreferenceRow]) -> set[str]:
        asked = {_asked(r.prompt) for r in rows}
        answered = {owners[m.content] for r in rows for ms, _ in r.ranked() for m in ms}
        return asked | answered

    train = names(splits.preference_train)
    train |= {_asked(r.messages[:-1]) for r in splits.sft_train}
    train |= {owners[r.messages[-1].content] for r in splits.sft_train}
    train |= {_asked(r.messages) for r in splits.prompts_train}
    heldout = names(splits.preference_heldout) | {
        _asked(r.messages) for r in splits.prompts_heldout
    }
    assert train == train_names
    assert heldout == heldout_names


def test_chosen_differs_from_rejected(splits: TaskSplits) -> None:
    """Every pair's answers differ beyond case, whitespace and punctuation."""
    for row in [*splits.preference_train, *splits.preference_heldout]:
        assert row.chosen is not None and row.rejected is not None
        assert _normalised(row.chosen[0].content) != _normalised(row.rejected[0].content), row


def test_chosen_is_the_asked_functions_own_docstring(splits: TaskSplits) -> None:
    """The chosen answer (and the SFT answer) is text of the asked function's real docstring."""
    rows = [(r.prompt, r.chosen) for r in [*splits.preference_train, *splits.preference_heldout]]
    rows += [(r.messages[:-1], r.messages[-1:]) for r in splits.sft_train]
    for prompt, chosen in rows:
        assert chosen is not None
        module_name, _, attribute = _asked(prompt).rpartition(".")
        obj = getattr(importlib.import_module(module_name), attribute)
        docstring = " ".join(inspect.cleandoc(obj.__doc__).split())
        assert chosen[0].content in docstring, (module_name, attribute)


def test_every_row_round_trips_through_jsonl(splits: TaskSplits, tmp_path: Path) -> None:
    """`write` -> `read_rows` gives back every row, none dropped, and task.json counts them."""
    paths = splits.write(tmp_path)
    read: dict[str, tuple[Sequence[object], DataReport]] = {
        "sft": read_rows(paths["sft"], SftRow),
        "preferences": read_rows(paths["preferences"], PreferenceRow),
        "preferences_heldout": read_rows(paths["preferences_heldout"], PreferenceRow),
        "prompts": read_rows(paths["prompts"], PromptRow),
        "prompts_heldout": read_rows(paths["prompts_heldout"], PromptRow),
    }
    written: dict[str, Sequence[object]] = {
        "sft": splits.sft_train,
        "preferences": splits.preference_train,
        "preferences_heldout": splits.preference_heldout,
        "prompts": splits.prompts_train,
        "prompts_heldout": splits.prompts_heldout,
    }
    task = json.loads(paths["task"].read_text())
    for name, rows in written.items():
        assert paths[name] == tmp_path / f"{name}.jsonl"
        assert read[name][0] == rows
        assert read[name][1].used == len(rows) and not read[name][1].dropped
        assert task["rows"][name] == len(rows)
    assert task["heldout_functions"] == [f.name for f in splits.heldout_functions]


def test_sizes_and_counts(splits: TaskSplits) -> None:
    """Hundreds of usable functions; one row of each kind per function; 20% held out."""
    n_train, n_heldout = len(splits.train_functions), len(splits.heldout_functions)
    assert splits.functions.used == n_train + n_heldout >= 600
    assert sum(splits.functions.dropped.values()) > 0  # skips are counted, by reason
    assert len(splits.sft_train) == len(splits.preference_train) == len(splits.prompts_train)
    assert len(splits.preference_train) == n_train >= 400
    assert len(splits.preference_heldout) == len(splits.prompts_heldout) == n_heldout >= 100
    assert n_heldout == round(0.2 * (n_train + n_heldout))


@pytest.mark.parametrize("max_answer_chars", [60, 200])
def test_answers_are_bounded(max_answer_chars: int) -> None:
    """No answer is longer than max_answer_chars, and a tighter bound keeps fewer functions."""
    splits = DocstringTask().build(seed=0, max_answer_chars=max_answer_chars)
    answers = [f.answer for f in [*splits.train_functions, *splits.heldout_functions]]
    assert max(len(a) for a in answers) <= max_answer_chars
    assert all(a == " ".join(a.split()) and len(a.split()) >= 3 for a in answers)
    assert splits.functions.used >= (300 if max_answer_chars == 60 else 600)


def test_rows_are_short_in_tokens(splits: TaskSplits) -> None:
    """With the real tokenizer every SFT row and every prompt + both answers fit in 128 tokens."""
    chat, report = ChatFormat(Tokenizer.llama3()), DataReport()
    assert len(encode_sft(chat, splits.sft_train, 128, report)) == len(splits.sft_train)
    rows = [*splits.preference_train, *splits.preference_heldout]
    assert len(encode_ranked(chat, rows, 128, report)) == len(rows)
    assert not report.dropped


def test_limit_keeps_that_many_functions() -> None:
    """limit=40 keeps 40 functions (8 held out) drawn by the seed."""
    splits = DocstringTask().build(seed=0, limit=40)
    assert len(splits.train_functions) == 32 and len(splits.heldout_functions) == 8
    assert len(splits.preference_train) == 32 and len(splits.preference_heldout) == 8


def test_same_module_fraction_draws_negatives_from_the_module() -> None:
    """same_module_fraction=1 rejects with a sibling of the same module whenever there is one."""
    splits = DocstringTask().build(seed=0, same_module_fraction=1.0)
    owners = _owners(splits)
    for functions, rows in [
        (splits.train_functions, splits.preference_train),
        (splits.heldout_functions, splits.preference_heldout),
    ]:
        modules = [f.module for f in functions]
        for function, row in zip(functions, rows, strict=True):
            assert row.rejected is not None
            rejected = owners[row.rejected[0].content]
            if modules.count(function.module) > 1:
                assert rejected.startswith(function.module + ".") and rejected != function.name


@pytest.mark.parametrize("same_module_fraction", [0.0, 1.0])
def test_negatives_rank_the_true_answer_above_distinct_others(same_module_fraction: float) -> None:
    """negatives=4: one ranked row per function, its true answer rank 0 above four different
    other functions' answers of its split (rank 1); DPO reads each row as four pairs."""
    four = DocstringTask().build(seed=0, same_module_fraction=same_module_fraction, negatives=4)
    one = DocstringTask().build(seed=0, same_module_fraction=same_module_fraction)
    owners = _owners(four)
    assert four.sft_train == one.sft_train and four.prompts_heldout == one.prompts_heldout
    for functions, rows in [
        (four.train_functions, four.preference_train),
        (four.heldout_functions, four.preference_heldout),
    ]:
        split = {f.name for f in functions}
        assert len(rows) == len(functions)
        for function, row in zip(functions, rows, strict=True):
            assert _asked(row.prompt) == function.name and row.chosen is None
            ranked = [(owners[ms[0].content], rank) for ms, rank in row.ranked()]
            assert ranked[0] == (function.name, 0)
            others = [name for name, rank in ranked[1:] if rank == 1]
            assert len(set(others)) == len(others) == 4 and function.name not in others
            assert set(others) <= split
    chat = ChatFormat(Tokenizer.llama3())
    assert len(encode_preference(chat, four.preference_heldout[:3], 1024)) == 12


def test_system_message_is_optional() -> None:
    """Without a system message a prompt is the question alone; with one it comes first."""
    plain = DocstringTask().build(seed=0, limit=10)
    assert [m.role for m in plain.prompts_train[0].messages] == ["user"]
    name = plain.train_functions[0].name
    assert plain.prompts_train[0].messages[0].content == QUESTION.format(name=name)
    system = DocstringTask(system="Answer briefly.").build(seed=0, limit=10)
    assert [m.role for m in system.preference_train[0].prompt] == ["system", "user"]
    assert [m.role for m in system.sft_train[0].messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heldout_fraction": 0.0}, "heldout_fraction=0.0"),
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0"),
        ({"limit": 3}, "limit=3"),
        ({"limit": 5, "heldout_fraction": 0.1}, "each split needs >= 2"),
        ({"max_answer_chars": 10}, "max_answer_chars=10"),
        ({"same_module_fraction": 2.0}, "same_module_fraction=2.0"),
        ({"negatives": 0}, "negatives=0"),
        ({"limit": 10, "negatives": 2}, "negatives <= 1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict[str, float], message: str) -> None:
    """A bad argument raises ValueError naming it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        DocstringTask().build(**kwargs)  # type: ignore[arg-type]


def test_unimportable_module_is_named() -> None:
    """A module that cannot be imported is named in the error."""
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        DocstringTask(modules=("no_such_module_xyz",)).harvest()


def _documented(name: str, doc: str | None) -> Callable[[], None]:
    def function() -> None:
        pass

    function.__name__ = name
    function.__doc__ = doc
    return function


def test_skip_rules_on_a_made_up_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of unusable docstring is skipped under its reason; good ones are cut right."""
    module = types.ModuleType("fake_stdlib")
    good = _documented("good", "Return the thing.\n\n    More detail here.")
    docs = {
        "good": good,
        "same_as_good": good,
        "cut": _documented(
            "cut", "First sentence here. Second sentence is kept too. Third " + "x" * 80
        ),
        "colon": _documented("colon", "Parse a value quickly. For example:\n\n    parse(1)"),
        "nodoc": _documented("nodoc", None),
        "blank": _documented("blank", "   \n  "),
        "signature": _documented("signature", "signature(a, b) -> int"),
        "sig_then_text": _documented("sig_then_text", "sig_then_text(x) -> bool\n\nTest the x."),
        "short": _documented("short", "Gt"),
        "long": _documented("long", "Word " * 30 + "end."),
        "twin": _documented("twin", "return the  THING"),
        "imported": str,
        "_private": _documented("_private", "A private helper function."),
    }
    for name, obj in docs.items():
        setattr(module, name, obj)
    for function in docs.values():
        if isinstance(function, types.FunctionType):
            function.__module__ = "fake_stdlib"
    exports = types.ModuleType("fake_exports")  # with __all__: what it lists is its API
    exports.__all__ = ["text", "good_again"]  # type: ignore[attr-defined]
    exports.text = str  # type: ignore[attr-defined]
    exports.good_again = good  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_stdlib", module)
    monkeypatch.setitem(sys.modules, "fake_exports", exports)
    task = DocstringTask(modules=("fake_stdlib", "fake_exports"))
    usable, report = task.harvest(max_answer_chars=60)
    assert usable == [
        DocFunction("fake_stdlib.colon", "fake_stdlib", "Parse a value quickly."),
        DocFunction(
            "fake_stdlib.cut", "fake_stdlib", "First sentence here. Second sentence is kept too."
        ),
        DocFunction("fake_stdlib.good", "fake_stdlib", "Return the thing."),
        DocFunction("fake_stdlib.sig_then_text", "fake_stdlib", "Test the x."),
    ]
    assert report.used == 4
    assert report.dropped == {
        "alias": 2,
        "imported from another module": 1,
        "no docstring": 2,
        "signature only": 1,
        "fewer than 3 words": 1,
        "first sentence longer than 60 characters": 1,
        "near-duplicate docstring": 1,
        "a builtin re-exported": 1,
    }
    assert report.examples["near-duplicate docstring"] == ["fake_stdlib.twin ~ fake_stdlib.good"]
    assert report.examples["alias"] == [
        "fake_stdlib.same_as_good is fake_stdlib.good",
        "fake_exports.good_again is fake_stdlib.good",
    ]
