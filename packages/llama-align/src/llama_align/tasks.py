"""A verifiable post-training task built offline from real text: Python standard-library functions
and their own docstrings (the preference data of §4.1.2-4.1.4 of "The Llama 3 Herd of Models",
made checkable: the right answer is known).

A question is a user message, ``What does `json.dumps` do?``; the true answer is the start of the
function's docstring (its first paragraph, cut to the leading sentences that fit in
`max_answer_chars`, whitespace normalised). A preference row chooses the true answer over another
function's (a seeded pick). SFT rows are the questions with their true answers; prompt rows
(for rejection sampling, §4.1.3) are the questions alone.

The split is by function: a function of the held-out split appears in no training row in any
role (question, chosen or rejected answer), so held-out accuracy measures whether the reward model
or policy learnt to match names to descriptions, not whether it memorised pairs.

Source and determinism: the docstrings are read with `inspect` from the running interpreter's
standard library (the modules of `STDLIB_MODULES`, all platform-independent: `posixpath` rather
than `os.path`), so the rows are a function of the seed and the Python version (3.11.7 gives 736
usable functions of 884 found: 589 pairs to train on, 147 held out). Functions without a usable docstring are skipped and counted by reason
(`TaskSplits.functions`): no docstring, a signature line only, too short, a first sentence longer
than `max_answer_chars`, or an answer that near-duplicates an earlier function's (equal once case,
whitespace, quotes and sentence punctuation are ignored: ``binascii.hexlify`` and ``b2a_hex``,
``operator.inv`` and ``invert``), so that chosen != rejected is always a meaningful difference.
Answers that differ in a single word stay (``logging.debug``'s "severity 'DEBUG'" against
``logging.info``'s "'INFO'", ``operator.mul``'s "a * b" against ``operator.add``'s "a + b"): the
word is what tells the functions apart.

Rows are short, for tiny models on a few CPU cores: with the Llama 3 tokenizer and no system
message an SFT row is 34 tokens on average (at most 72), a prompt with both answers 47 (at most 96).
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llama_align.data import (
    DataReport,
    PreferenceRow,
    PromptRow,
    RankedResponse,
    SftRow,
    write_rows,
)
from llama_model import Message, atomic_write

__all__ = [
    "STDLIB_MODULES",
    "QUESTION",
    "DocFunction",
    "DocstringTask",
    "TaskSplits",
]

STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "base64",
    "binascii",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "colorsys",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "posixpath",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "tarfile",
    "tempfile",
    "textwrap",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
)
"""The modules whose public functions and classes make the task: pure-Python or C modules whose
docstrings do not depend on the platform (`posixpath`, not `os.path`; no `os`, `time`, `socket`);
`ast` is left out (its node classes document a grammar signature, not what they do) and so is
`cmath` (its docstrings repeat `math`'s with z for x: a held-out twin would test recall)."""

QUESTION = "What does `{name}` do?"
"""The user message; `name` is the qualified name, e.g. ``json.dumps``."""

MIN_ANSWER_WORDS = 3
"""A first sentence with fewer words (``Gt``, ``Mod``) says nothing checkable."""

# A paragraph that is a call signature, not a description: `S_ISDIR(mode) -> bool`,
# `date(year, month, day) --> date object`, `quote('abc def') -> 'abc%20def'`.
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(-+>.*)?$")
# Sentence ends: a full stop (or ! ?) followed by space and an upper-case letter or a quote, so
# "e.g. the path" and "(eg. zip or tar)" are not cut.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")
_KEY_IGNORED = re.compile(r"[\s.,;:!?'\"`]+")


@dataclass(frozen=True)
class DocFunction:
    """One usable stdlib function (or class) and the answer its docstring gives."""

    name: str
    """The qualified name asked about, e.g. ``json.dumps``."""
    module: str
    """The module it was found in (one of `DocstringTask.modules`)."""
    answer: str
    """The docstring's first paragraph, whitespace normalised, cut to whole sentences."""


@dataclass
class TaskSplits:
    """The task's rows, split by function, and how they were made (`write` saves them)."""

    sft_train: list[SftRow]
    """Training questions with their true answers."""
    preference_train: list[PreferenceRow]
    """Training questions: chosen the true answer, rejected another training function's."""
    preference_heldout: list[PreferenceRow]
    """Held-out questions: chosen the true answer, rejected another held-out function's."""
    prompts_train: list[PromptRow]
    """Training questions alone (for rejection sampling)."""
    prompts_heldout: list[PromptRow]
    """Held-out questions alone."""
    train_functions: tuple[DocFunction, ...]
    """The functions of the training rows (in every role)."""
    heldout_functions: tuple[DocFunction, ...]
    """The functions of the held-out rows (in every role); disjoint from `train_functions`."""
    functions: DataReport
    """Functions found: `used` usable ones, `dropped` the skipped ones by reason with examples."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What built it: seed, fractions, limits, modules, Python version."""

    def describe(self) -> dict[str, Any]:
        """Plain data for `task.json`: source, settings, counts, and the functions of each split."""
        return {
            "task": "stdlib docstrings",
            "source": (
                f"docstrings of Python {platform.python_version()}'s standard library, read "
                "with inspect"
            ),
            "question": QUESTION,
            **self.settings,
            "functions": self.functions.as_dict(),
            "rows": {
                "sft": len(self.sft_train),
                "preferences": len(self.preference_train),
                "preferences_heldout": len(self.preference_heldout),
                "prompts": len(self.prompts_train),
                "prompts_heldout": len(self.prompts_heldout),
            },
            "train_functions": [f.name for f in self.train_functions],
            "heldout_functions": [f.name for f in self.heldout_functions],
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the five JSONL files and `task.json` into `out_dir` (created if missing), each
        atomically; returns the paths by name (``sft``, ``preferences``, ...)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[BaseModel]] = {
            "sft": list(self.sft_train),
            "preferences": list(self.preference_train),
            "preferences_heldout": list(self.preference_heldout),
            "prompts": list(self.prompts_train),
            "prompts_heldout": list(self.prompts_heldout),
        }
        paths = {name: write_rows(out / f"{name}.jsonl", rows) for name, rows in files.items()}
        task = out / "task.json"
        with atomic_write(task) as tmp:
            tmp.write_text(json.dumps(self.describe(), indent=2) + "\n", encoding="utf-8")
        paths["task"] = task
        return paths


@dataclass(frozen=True)
class DocstringTask:
    """Questions about stdlib functions, answered by their docstrings (see the module docstring).

    `build` harvests the docstrings, splits the functions with a seed and makes the rows.
    """

    modules: tuple[str, ...] = STDLIB_MODULES
    """The modules to read (importable names, e.g. ``urllib.parse``)."""
    system: str | None = None
    """An optional system message put before every question (off: prompts stay short)."""

    def harvest(self, max_answer_chars: int = 200) -> tuple[list[DocFunction], DataReport]:
        """Every usable function of `modules` in module then name order, and the report of the
        functions found (`used`) and skipped by reason (`dropped`, with examples)."""
        if max_answer_chars < 20:
            raise ValueError(
                f"max_answer_chars={max_answer_chars} is too small for a sentence; use >= 20"
            )
        report = DataReport()
        usable: list[DocFunction] = []
        seen_objects: dict[int, str] = {}
        seen_answers: dict[str, str] = {}
        for module_name in self.modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                raise ValueError(
                    f"module {module_name!r} cannot be imported ({error}); remove it from modules"
                ) from error
            for short, obj in _public_callables(module):
                name = f"{module_name}.{short}"
                if _imported(module, module_name, obj):
                    report.drop("imported from another module", f"{name} from {obj.__module__}")
                    continue
                if getattr(obj, "__module__", None) == "builtins":
                    report.drop("a builtin re-exported", f"{name} is {obj.__name__}")
                    continue
                if id(obj) in seen_objects:
                    report.drop("alias", f"{name} is {seen_objects[id(obj)]}")
                    continue
                seen_objects[id(obj)] = name
                answer, reason = _answer(obj.__doc__, max_answer_chars)
                if answer is None:
                    report.drop(reason, name)
                    continue
                key = _near_duplicate_key(answer)
                if key in seen_answers:
                    report.drop("near-duplicate docstring", f"{name} ~ {seen_answers[key]}")
                    continue
                seen_answers[key] = name
                usable.append(DocFunction(name, module_name, answer))
                report.used += 1
        return usable, report

    def build(
        self,
        seed: int = 0,
        heldout_fraction: float = 0.2,
        max_answer_chars: int = 200,
        limit: int | None = None,
        *,
        same_module_fraction: float = 0.0,
        negatives: int = 1,
    ) -> TaskSplits:
        """The rows of the task, split by function.

        The usable functions are shuffled with `seed`; the first `limit` (all if None) are kept,
        a `heldout_fraction` of them (rounded) held out. Each function gives one row of each kind
        in its split, in the shuffled order (so a prefix of any list is a random sample).

        A preference row ranks the true answer above `negatives` answers of other functions of
        the same split, drawn with `seed` (all different): from the same module (a harder
        negative) with probability `same_module_fraction` when that module has another function
        not yet drawn. One negative gives TRL's chosen/rejected row; more give a ranked
        `responses` row (true rank 0, every negative rank 1: §4.1.2's several responses per
        prompt), which the reward model trains on in one row and DPO expands into a pair per
        negative. More negatives mean more comparisons per true answer (measured: they move a
        tiny model from memorising the training pairs to matching names to descriptions) and a
        smaller sampling error on the held-out accuracy.
        """
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.2")
        if not 0.0 <= same_module_fraction <= 1.0:
            raise ValueError(f"same_module_fraction={same_module_fraction} must be in [0, 1]")
        if negatives < 1:
            raise ValueError(f"negatives={negatives} must be >= 1 (rejected answers per function)")
        if limit is not None and limit < 4:
            raise ValueError(f"limit={limit} is too small: each split needs >= 2 functions")
        usable, report = self.harvest(max_answer_chars)
        rng = random.Random(seed)
        chosen = list(usable)
        rng.shuffle(chosen)
        if limit is not None:
            chosen = chosen[:limit]
        n_heldout = round(heldout_fraction * len(chosen))
        if n_heldout < 2 or len(chosen) - n_heldout < 2:
            raise ValueError(
                f"heldout_fraction={heldout_fraction} of {len(chosen)} functions leaves "
                f"{n_heldout} held out and {len(chosen) - n_heldout} for training; each split "
                "needs >= 2 (raise limit or move heldout_fraction towards 0.5)"
            )
        if negatives > n_heldout - 1:
            raise ValueError(
                f"negatives={negatives} needs that many other functions in each split, but the "
                f"held-out split has {n_heldout}; use negatives <= {n_heldout - 1}"
            )
        heldout, train = tuple(chosen[:n_heldout]), tuple(chosen[n_heldout:])
        preference_train = self._preferences(train, rng, same_module_fraction, negatives)
        preference_heldout = self._preferences(heldout, rng, same_module_fraction, negatives)
        return TaskSplits(
            sft_train=[
                SftRow(messages=[*self._prompt(f), Message(role="assistant", content=f.answer)])
                for f in train
            ],
            preference_train=preference_train,
            preference_heldout=preference_heldout,
            prompts_train=[PromptRow(messages=self._prompt(f)) for f in train],
            prompts_heldout=[PromptRow(messages=self._prompt(f)) for f in heldout],
            train_functions=train,
            heldout_functions=heldout,
            functions=report,
            settings={
                "seed": seed,
                "heldout_fraction": heldout_fraction,
                "max_answer_chars": max_answer_chars,
                "limit": limit,
                "same_module_fraction": same_module_fraction,
                "negatives": negatives,
                "system": self.system,
                "python": platform.python_version(),
                "modules": list(self.modules),
            },
        )

    def _prompt(self, function: DocFunction) -> list[Message]:
        question = Message(role="user", content=QUESTION.format(name=function.name))
        if self.system is None:
            return [question]
        return [Message(role="system", content=self.system), question]

    def _preferences(
        self,
        functions: tuple[DocFunction, ...],
        rng: random.Random,
        same_module_fraction: float,
        negatives: int,
    ) -> list[PreferenceRow]:
        """One row per function: chosen/rejected for one negative, else ranked `responses` (the
        true answer rank 0, each of `negatives` other functions' answers rank 1)."""
        by_module: dict[str, list[int]] = {}
        for index, function in enumerate(functions):
            by_module.setdefault(function.module, []).append(index)
        rows = []
        for index, function in enumerate(functions):
            used, drawn = {index}, []
            for _ in range(negatives):
                siblings = [i for i in by_module[function.module] if i not in used]
                if siblings and rng.random() < same_module_fraction:
                    other = rng.choice(siblings)
                else:
                    others = [i for i in range(len(functions)) if i not in used]
                    other = others[rng.randrange(len(others))]
                used.add(other)
                drawn.append(other)
            true = [Message(role="assistant", content=function.answer)]
            wrong = [[Message(role="assistant", content=functions[i].answer)] for i in drawn]
            if negatives == 1:
                rows.append(
                    PreferenceRow(prompt=self._prompt(function), chosen=true, rejected=wrong[0])
                )
                continue
            responses = [RankedResponse(messages=true, rank=0)]
            responses += [RankedResponse(messages=w, rank=1) for w in wrong]
            rows.append(PreferenceRow(prompt=self._prompt(function), responses=responses))
        return rows


def _public_callables(module: Any) -> list[tuple[str, Any]]:
    """The module's public functions and classes, by name: those of `__all__` when it has one,
    else every public name."""
    exported = getattr(module, "__all__", None)
    names = sorted(set(exported) if exported is not None else dir(module))
    found = ((name, getattr(module, name, None)) for name in names if not name.startswith("_"))
    return [(name, obj) for name, obj in found if _is_callable_kind(obj)]


def _imported(module: Any, module_name: str, obj: object) -> bool:
    """True for a name a module without `__all__` imported from elsewhere (`statistics`'
    `bisect_left`): not its own API. Its own names come from it or its C twin (``_heapq``)."""
    if hasattr(module, "__all__"):
        return False
    own = {module.__name__, module_name, "_" + module_name.rsplit(".", 1)[-1], None}
    return getattr(obj, "__module__", None) not in own


def _is_callable_kind(obj: object) -> bool:
    return (
        inspect.isfunction(obj)
        or inspect.isbuiltin(obj)
        or inspect.ismethod(obj)
        or inspect.isclass(obj)
    )


def _answer(doc: object, max_chars: int) -> tuple[str | None, str]:
    """(the answer, "") or (None, why the docstring is not usable)."""
    if not isinstance(doc, str) or not doc.strip():
        return None, "no docstring"
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    paragraphs = [p for p in paragraphs if p and not _SIGNATURE.match(p)]
    if not paragraphs:
        return None, "signature only"
    sentences = _SENTENCE_END.split(paragraphs[0])
    while sentences and sentences[-1].endswith(":"):
        sentences.pop()  # "For example:" introduces what the answer leaves out
    if not sentences:
        return None, "introduces a list or example only"
    answer = sentences[0]
    if len(answer) > max_chars:
        return None, f"first sentence longer than {max_chars} characters"
    for sentence in sentences[1:]:
        if len(answer) + 1 + len(sentence) > max_chars:
            break
        answer = f"{answer} {sentence}"
    if len(answer.split()) < MIN_ANSWER_WORDS:
        return None, f"fewer than {MIN_ANSWER_WORDS} words"
    return answer, ""


def _near_duplicate_key(answer: str) -> str:
    """Answers with the same key are near-duplicates: case, whitespace, quotes and sentence
    punctuation ignored; words, digits and operator symbols (``*``, ``+``, ``~``) kept."""
    return " ".join(_KEY_IGNORED.sub(" ", answer.lower()).split())
