"""The `llama-data` command: run a curation pipeline described by a TOML file.

```toml
inputs = ["crawl/*.jsonl.gz"]      # files or globs, relative to this file
out_dir = "curated"                # parts/, stats.json and (with global steps) documents.jsonl.gz
workers = 4                        # local processes (or Ray CPUs: backend = "ray")
partitions = 16                    # hash partitions of the global steps' sharded stages

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

[[global_steps]]                   # over everything, as sharded stages
type = "near_dedup"                # every field of llama_data.dedup.NearDedupConfig
threshold = 0.8
confirm = "exact"                  # or "estimate" (MinHash estimate, +/-0.035 at 0.8)
```

Run `llama-data run pipeline.toml`; `llama-data steps` lists the step types and their options
with their defaults. Every step's options are a pydantic model with the same defaults the Python
API uses (a `near_dedup` table builds exactly `NearDedup(NearDedupConfig(**table))`), and a bad
file is answered with every problem, one line each, naming the key, its value and the valid keys.
Re-running the same command resumes an interrupted run (see `llama_data.pipeline`).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import inspect
import json
import sys
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticUndefined
from tqdm import tqdm

from llama_data._atomic import atomic_write
from llama_data._config_errors import format_validation_error, unknown_name
from llama_data.dedup import ExactDedup, LineDedup, NearDedup, NearDedupConfig, UrlDedup
from llama_data.document import Step, StepStats
from llama_data.extract import HtmlExtractor
from llama_data.filters import DirtyWordConfig, DirtyWordFilter, UrlBlocklist
from llama_data.langid import LanguageFilter, LanguageFilterConfig, LanguageIdentifier
from llama_data.pii import PiiConfig, PiiScrubber
from llama_data.pipeline import Pipeline
from llama_data.quality import FastTextClassifier, QualityFilter
from llama_data.quality_rules import (
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
)
from llama_data.readers import read_jsonl
from llama_data.shards import DEFAULT_SHARD_TOKENS, Manifest, write_token_shards

__all__ = [
    "STEP_TYPES",
    "PipelineFile",
    "PipelineFileError",
    "StepType",
    "build_step",
    "load_pipeline",
    "main",
]

_OPTIONS = ConfigDict(frozen=True, extra="forbid")


class TokenShardsOptions(BaseModel):
    """The `[token_shards]` table: tokenize the curated documents into token shards."""

    model_config = _OPTIONS

    tokenizer: str
    """Where the tokenizer comes from, "module:attribute": a tokenizer object, or a callable
    with no arguments that returns one (e.g. "llama_model:Tokenizer.llama3", the Llama 3
    tokenizer from llama-model)."""
    out_dir: str = "tokens"
    """The token shard directory (relative to the pipeline file)."""
    shard_tokens: PositiveInt = DEFAULT_SHARD_TOKENS
    """Tokens per shard file."""


class PipelineFile(BaseModel):
    """The TOML file's top level."""

    model_config = _OPTIONS

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
    """Steps over the whole corpus (deduplication), in order, after the per-file steps; each runs
    as sharded stages (`llama_data.sharded`)."""
    partitions: PositiveInt = 16
    """Hash partitions of the global steps' keys: size them so corpus / partitions fits one
    worker's memory (the result does not depend on them)."""
    token_shards: TokenShardsOptions | None = None
    """Tokenize the curated documents (`documents.jsonl.gz`; needs `global_steps`) into token
    shards for llama-train."""

    @model_validator(mode="after")
    def _tokens_need_documents(self) -> PipelineFile:
        if self.token_shards is not None and not self.global_steps:
            raise ValueError(
                "token_shards tokenizes documents.jsonl.gz, which only global_steps write; "
                "add a global step (e.g. exact_dedup) or remove [token_shards]"
            )
        return self


class PipelineFileError(ValueError):
    """A pipeline file that does not describe a pipeline; the message has one line per problem."""


# ---------------------------------------------------------------------------------------------
# The options each step type accepts: the step's own config model where it has one (so its
# defaults are defined once), extended with the file/list entries a table may name.


def _exactly_one(file: str | None, entries: list[str] | None, list_key: str) -> None:
    if (file is None) == (entries is None):
        raise ValueError(f"give exactly one of `file` or `{list_key}`")


class UrlBlocklistOptions(BaseModel):
    """A `url_blocklist` table."""

    model_config = _OPTIONS

    file: str | None = None
    """A block list file (one domain a line, '#' comments), relative to the pipeline file."""
    domains: list[str] | None = None
    """The domains, inline (instead of `file`)."""

    @model_validator(mode="after")
    def _one_source(self) -> UrlBlocklistOptions:
        _exactly_one(self.file, self.domains, "domains")
        return self


class DirtyWordsOptions(DirtyWordConfig):
    """A `dirty_words` table: `DirtyWordConfig` plus where the words come from."""

    file: str | None = None
    """A word list file (one word or phrase a line), relative to the pipeline file."""
    words: list[str] | None = None
    """The words, inline (instead of `file`)."""

    @model_validator(mode="after")
    def _one_source(self) -> DirtyWordsOptions:
        _exactly_one(self.file, self.words, "words")
        return self


class LanguageOptions(LanguageFilterConfig):
    """A `language` table: `LanguageFilterConfig` plus an optional language-ID model."""

    model_path: str | None = None
    """A fastText language-ID model (.ftz/.bin), relative to the pipeline file; default lid.176."""


def _signature_options(
    name: str, step: type[Step], *, skip: tuple[str, ...] = (), **extra: Any
) -> type[BaseModel]:
    """An options model from `step`'s keyword parameters: their types and their defaults (so
    the defaults stay where the constructor defines them), plus `extra` fields."""
    hints = typing.get_type_hints(step.__init__)
    fields: dict[str, Any] = dict(extra)
    for parameter in inspect.signature(step).parameters.values():
        if parameter.name in skip or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], default)
    model: type[BaseModel] = create_model(name, __config__=_OPTIONS, **fields)
    return model


QualityOptions = _signature_options(
    "QualityOptions", QualityFilter, skip=("classifier",), model=(str, ...)
)


def _quality(options: Any, base: Path) -> Step:
    settings = options.model_dump(exclude={"model"})
    return QualityFilter(FastTextClassifier.load(base / options.model), **settings)


def _language(options: LanguageOptions, base: Path) -> Step:
    config = LanguageFilterConfig(**options.model_dump(exclude={"model_path"}))
    model = options.model_path
    return LanguageFilter(config, LanguageIdentifier(base / model) if model is not None else None)


def _dirty_words(options: DirtyWordsOptions, base: Path) -> Step:
    words = base / options.file if options.file is not None else options.words or []
    return DirtyWordFilter(words, DirtyWordConfig(**options.model_dump(exclude={"file", "words"})))


def _url_blocklist(options: UrlBlocklistOptions, base: Path) -> Step:
    return UrlBlocklist(base / options.file if options.file is not None else options.domains or [])


def _keywords(step: type[Step]) -> Callable[[BaseModel, Path], Step]:
    """Build `step` from an options model whose fields are its keyword arguments."""
    return lambda options, base: step(**options.model_dump())


@dataclass(frozen=True)
class StepType:
    """A step type a pipeline file may name: the options its table accepts, and how to build it."""

    options: type[BaseModel]
    """The table's keys (besides `type`): a frozen pydantic model with extra keys forbidden."""
    build: Callable[[Any, Path], Step]
    """The step from validated options and the pipeline file's directory (for relative paths)."""


STEP_TYPES: dict[str, StepType] = {
    "html": StepType(_signature_options("HtmlOptions", HtmlExtractor), _keywords(HtmlExtractor)),
    "url_blocklist": StepType(UrlBlocklistOptions, _url_blocklist),
    "dirty_words": StepType(DirtyWordsOptions, _dirty_words),
    "pii": StepType(PiiConfig, lambda options, base: PiiScrubber(options)),
    "gopher_quality": StepType(
        GopherQualityConfig, lambda options, base: GopherQualityFilter(options)
    ),
    "gopher_repetition": StepType(
        GopherRepetitionConfig, lambda options, base: GopherRepetitionFilter(options)
    ),
    "language": StepType(LanguageOptions, _language),
    "quality": StepType(QualityOptions, _quality),
    "url_dedup": StepType(_signature_options("UrlDedupOptions", UrlDedup), _keywords(UrlDedup)),
    "exact_dedup": StepType(
        _signature_options("ExactDedupOptions", ExactDedup), _keywords(ExactDedup)
    ),
    "near_dedup": StepType(NearDedupConfig, lambda options, base: NearDedup(options)),
    "line_dedup": StepType(_signature_options("LineDedupOptions", LineDedup), _keywords(LineDedup)),
}
"""Step types a pipeline file may name."""


def describe_options(options: type[BaseModel]) -> str:
    """The keys of an options model with their defaults, for `llama-data steps`."""
    parts = []
    for name, field in options.model_fields.items():
        default = field.get_default(call_default_factory=True)
        parts.append(
            f"{name} (required)" if default is PydanticUndefined else f"{name}={default!r}"
        )
    return ", ".join(parts) or "(none)"


def build_step(table: dict[str, Any], base: Path, where: str) -> Step:
    """The step a `[[steps]]` table describes; a `PipelineFileError` lists what to change."""
    options = dict(table)
    kind = options.pop("type", None)
    if kind is None:
        raise PipelineFileError(
            f"  {where}.type: missing; this key is required (one of: {', '.join(sorted(STEP_TYPES))})"
        )
    if kind not in STEP_TYPES:
        problem = unknown_name(str(kind), sorted(STEP_TYPES), "step type")
        raise PipelineFileError(f"  {where}.type = {kind!r}: {problem}")
    step_type = STEP_TYPES[kind]
    try:
        validated = step_type.options.model_validate(options)
    except ValidationError as err:
        raise PipelineFileError(
            format_validation_error(err, step_type.options, prefix=where)
        ) from err
    try:
        return step_type.build(validated, base)
    except (TypeError, ValueError) as err:
        raise PipelineFileError(f"  {where} (type {kind!r}): {err}") from err


def load_pipeline(path: str | Path) -> tuple[Pipeline, list[Path], Path, PipelineFile]:
    """Read a pipeline TOML file: the pipeline, its input files, the output directory, the spec.

    Raises `PipelineFileError` listing every problem of the file's keys and step tables.
    """
    path = Path(path)
    with open(path, "rb") as f:
        table = tomllib.load(f)
    try:
        spec = PipelineFile.model_validate(table)
    except ValidationError as err:
        raise PipelineFileError(format_validation_error(err, PipelineFile)) from err
    base = path.parent
    problems: list[str] = []
    built: dict[str, list[Step]] = {"steps": [], "global_steps": []}
    for section, tables in (("steps", spec.steps), ("global_steps", spec.global_steps)):
        for i, step_table in enumerate(tables):
            try:
                built[section].append(build_step(step_table, base, f"{section}[{i}]"))
            except PipelineFileError as err:
                problems.append(str(err))
    if problems:
        raise PipelineFileError("\n".join(problems))
    inputs: list[Path] = []
    for pattern in spec.inputs:
        matches = sorted(glob.glob(str(base / pattern)))
        if not matches:
            raise FileNotFoundError(f"inputs pattern {pattern!r} matches no file under {base}")
        inputs += [Path(m) for m in matches]
    pipeline = Pipeline(
        built["steps"], global_steps=built["global_steps"], partitions=spec.partitions
    )
    return pipeline, inputs, base / spec.out_dir, spec


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llama-data` command."""
    parser = argparse.ArgumentParser(prog="llama-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) the pipeline a TOML file describes")
    run.add_argument("config", type=Path)
    run.add_argument("--workers", type=int, default=None, help="override the file's workers")
    run.add_argument("--no-progress", action="store_true")
    commands.add_parser("steps", help="list step types and their options (with defaults)")
    args = parser.parse_args(argv)
    if args.command == "steps":
        for name, step_type in STEP_TYPES.items():
            print(f"{name:<18} {describe_options(step_type.options)}")
        return 0
    try:
        pipeline, inputs, out_dir, spec = load_pipeline(args.config)
    except PipelineFileError as err:
        print(f"llama-data: {args.config}: invalid pipeline file:\n{err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, tomllib.TOMLDecodeError) as err:
        print(f"llama-data: {args.config}: {err}", file=sys.stderr)
        return 2
    tokenizer = None
    if spec.token_shards is not None:  # before the run: a typo should not cost a whole run
        try:
            tokenizer = _load_object(spec.token_shards.tokenizer)
        except (ImportError, AttributeError, ValueError) as err:
            print(f"llama-data: {args.config}: token_shards.tokenizer: {err}", file=sys.stderr)
            return 2
    report = pipeline.run(
        inputs,
        out_dir,
        workers=args.workers or spec.workers,
        progress=not args.no_progress,
        backend=spec.backend,
    )
    print(json.dumps({name: s.to_dict() for name, s in report.stats.items()}, indent=2))
    if spec.token_shards is not None:
        documents = Path(out_dir) / "documents.jsonl.gz"
        target = args.config.parent / spec.token_shards.out_dir
        manifest = tokenize_documents(
            documents,
            tokenizer,
            target,
            shard_tokens=spec.token_shards.shard_tokens,
            expected=report.stats[pipeline.global_steps[-1].name].kept,
            progress=not args.no_progress,
        )
        print(f"token shards: {target} ({manifest.num_tokens:,} tokens)")
    return 0


def _load_object(spec: str) -> Any:
    """The object "module:attribute.path" names; called if it is a callable, not a tokenizer."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"{spec!r} is not 'module:attribute' (e.g. 'llama_model:Tokenizer.llama3')"
        )
    obj: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        obj = getattr(obj, name)
    return obj if hasattr(obj, "encode") else obj()


def tokenize_documents(
    documents: Path,
    tokenizer: Any,
    out_dir: Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    expected: int | None = None,
    progress: bool = True,
) -> Manifest:
    """`write_token_shards` of a pipeline's `documents.jsonl.gz`, skipped when `out_dir` was
    written from this very file with these settings (a marker beside it says so)."""
    marker = out_dir.with_name(out_dir.name + ".done.json")
    stat = documents.stat()
    fingerprint = repr(
        (str(documents.resolve()), stat.st_size, stat.st_mtime_ns, shard_tokens, repr(tokenizer))
    )
    try:
        if json.loads(marker.read_text())["fingerprint"] == fingerprint:
            return Manifest.read(out_dir)
    except (OSError, ValueError, KeyError):
        pass
    marker.unlink(missing_ok=True)
    docs = tqdm(
        read_jsonl(documents, stats=StepStats(), max_chars=sys.maxsize),
        total=expected, unit="doc", desc="token shards", disable=not progress,
    )  # fmt: skip
    manifest = write_token_shards(
        docs, tokenizer, out_dir, shard_tokens=shard_tokens, overwrite=True
    )
    with atomic_write(marker) as temporary:
        temporary.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    return manifest


if __name__ == "__main__":
    sys.exit(main())
