"""The `llama-data` command: run a curation pipeline described by a TOML file.

```toml
inputs = ["crawl/*.jsonl.gz"]      # files or globs, relative to this file
out_dir = "curated"                # parts/, stats.json and (with global steps) documents.jsonl.gz
workers = 4

[[steps]]                          # per input file, in parallel
type = "url_blocklist"
file = "blocklist.txt"

[[steps]]
type = "pii"

[[steps]]
type = "gopher_quality"
min_words = 50                     # any field of the step's config

[[steps]]
type = "language"
min_score = 0.65
languages = ["en"]

[[global_steps]]                   # once, over everything
type = "near_dedup"
threshold = 0.8
```

Run `llama-data run pipeline.toml`; `llama-data steps` lists the step types and their options.
Re-running the same command resumes an interrupted run (see `llama_data.pipeline`).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from llama_data.dedup import ExactDedup, LineDedup, NearDedup, UrlDedup
from llama_data.document import Step
from llama_data.extract import HtmlExtractor
from llama_data.filters import DirtyWordConfig, DirtyWordFilter, UrlBlocklist
from llama_data.langid import LanguageFilter, LanguageFilterConfig, LanguageIdentifier
from llama_data.minhash import LshIndex, MinHasher
from llama_data.pii import PiiConfig, PiiScrubber
from llama_data.pipeline import Pipeline
from llama_data.quality import FastTextClassifier, QualityFilter
from llama_data.quality_rules import (
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
)

__all__ = ["STEP_TYPES", "PipelineFile", "build_step", "load_pipeline", "main"]


class PipelineFile(BaseModel):
    """The TOML file's top level."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: list[str] = Field(min_length=1)
    """Input files or glob patterns (relative to the TOML file); each match is one unit of work."""
    out_dir: str
    """Where parts, statistics and the final documents go (relative to the TOML file)."""
    workers: PositiveInt = 1
    """Worker processes (or Ray CPUs) for the per-file steps."""
    backend: Literal["processes", "ray"] = "processes"
    """Where the per-file work runs: local worker processes, or Ray (needs llama-data[ray])."""
    steps: list[dict[str, Any]] = []
    """Per-file steps, in order: tables with a `type` and that step's options."""
    global_steps: list[dict[str, Any]] = []
    """Steps over the whole corpus (deduplication), in order, after the per-file steps."""


def _with_file(
    make: Callable[[Any], Step], list_key: str
) -> Callable[[dict[str, Any], Path], Step]:
    """A builder for steps taking a list or a file of entries (`file` resolves next to the TOML)."""

    def build(options: dict[str, Any], base: Path) -> Step:
        options = dict(options)
        file = options.pop("file", None)
        entries = options.pop(list_key, None)
        if (file is None) == (entries is None):
            raise ValueError(f"give exactly one of `file` or `{list_key}`")
        return make((base / file) if file is not None else entries, **options)

    return build


def _near_dedup(options: dict[str, Any], base: Path) -> Step:
    options = dict(options)
    num_perm = options.pop("num_perm", 128)
    hasher = MinHasher(
        num_perm=num_perm, ngram=options.pop("ngram", 5), seed=options.pop("seed", 1)
    )
    index = LshIndex(
        threshold=options.pop("threshold", 0.8),
        num_perm=num_perm,
        bands=options.pop("bands", None),
        rows=options.pop("rows", None),
    )
    return NearDedup(hasher, index, **options)


STEP_TYPES: dict[str, tuple[Callable[[dict[str, Any], Path], Step], str]] = {
    "html": (lambda o, b: HtmlExtractor(**o), "favor, include_tables"),
    "url_blocklist": (
        _with_file(lambda domains: UrlBlocklist(domains), "domains"),
        "file or domains",
    ),
    "dirty_words": (
        _with_file(lambda words, **o: DirtyWordFilter(words, DirtyWordConfig(**o)), "words"),
        "file or words, and DirtyWordConfig fields",
    ),
    "pii": (lambda o, b: PiiScrubber(PiiConfig(**o)), "PiiConfig fields"),
    "gopher_quality": (
        lambda o, b: GopherQualityFilter(GopherQualityConfig(**o)),
        "GopherQualityConfig fields",
    ),
    "gopher_repetition": (
        lambda o, b: GopherRepetitionFilter(GopherRepetitionConfig(**o)),
        "GopherRepetitionConfig fields",
    ),
    "language": (
        lambda o, b: LanguageFilter(
            LanguageFilterConfig(**{k: v for k, v in o.items() if k != "model_path"}),
            LanguageIdentifier(b / o["model_path"]) if "model_path" in o else None,
        ),
        "LanguageFilterConfig fields, model_path",
    ),
    "quality": (
        lambda o, b: QualityFilter(
            FastTextClassifier.load(b / o["model"]), **{k: v for k, v in o.items() if k != "model"}
        ),
        "model (a FastTextClassifier .npz), label, threshold",
    ),
    "url_dedup": (lambda o, b: UrlDedup(**o), "date_key, spool_to_disk"),
    "exact_dedup": (lambda o, b: ExactDedup(**o), "(none)"),
    "near_dedup": (
        _near_dedup,
        "threshold, num_perm, ngram, seed, bands, rows, verify, batch_size",
    ),
    "line_dedup": (lambda o, b: LineDedup(**o), "max_occurrences, bucket_size"),
}
"""Step types a pipeline file may name: builder and a summary of its options."""


def build_step(table: dict[str, Any], base: Path, where: str) -> Step:
    """The step a `[[steps]]` table describes; errors name the table and what to change."""
    options = dict(table)
    kind = options.pop("type", None)
    if kind not in STEP_TYPES:
        raise ValueError(
            f"{where}: unknown step type {kind!r}; valid types: {', '.join(STEP_TYPES)}"
        )
    try:
        return STEP_TYPES[kind][0](options, base)
    except (TypeError, ValueError, ValidationError) as err:
        raise ValueError(f"{where} (type {kind!r}): {err}") from err


def load_pipeline(path: str | Path) -> tuple[Pipeline, list[Path], Path, PipelineFile]:
    """Read a pipeline TOML file: the pipeline, its input files, the output directory, the spec."""
    path = Path(path)
    with open(path, "rb") as f:
        spec = PipelineFile.model_validate(tomllib.load(f))
    base = path.parent
    steps = [build_step(t, base, f"steps[{i}]") for i, t in enumerate(spec.steps)]
    global_steps = [
        build_step(t, base, f"global_steps[{i}]") for i, t in enumerate(spec.global_steps)
    ]
    inputs: list[Path] = []
    for pattern in spec.inputs:
        matches = sorted(glob.glob(str(base / pattern)))
        if not matches:
            raise FileNotFoundError(f"inputs pattern {pattern!r} matches no file under {base}")
        inputs += [Path(m) for m in matches]
    return Pipeline(steps, global_steps=global_steps), inputs, base / spec.out_dir, spec


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llama-data` command."""
    parser = argparse.ArgumentParser(prog="llama-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) the pipeline a TOML file describes")
    run.add_argument("config", type=Path)
    run.add_argument("--workers", type=int, default=None, help="override the file's workers")
    run.add_argument("--no-progress", action="store_true")
    commands.add_parser("steps", help="list step types and their options")
    args = parser.parse_args(argv)
    if args.command == "steps":
        for name, (_, options) in STEP_TYPES.items():
            print(f"{name:<18} {options}")
        return 0
    try:
        pipeline, inputs, out_dir, spec = load_pipeline(args.config)
    except (OSError, ValueError, ValidationError, tomllib.TOMLDecodeError) as err:
        print(f"llama-data: {args.config}: {err}", file=sys.stderr)
        return 2
    report = pipeline.run(
        inputs,
        out_dir,
        workers=args.workers or spec.workers,
        progress=not args.no_progress,
        backend=spec.backend,
    )
    print(json.dumps({name: s.to_dict() for name, s in report.stats.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
