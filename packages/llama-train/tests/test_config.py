"""Tests for `llama_train.config.TrainConfig` and the `llama-train` CLI's config handling.

Precedence is CLI overrides > TOML file > defaults; unknown keys and inconsistent fields are
errors whose message names the field. The 405B recipe is checked against the numbers of §3.4.1 of
the Llama 3 paper, written out by hand here (never computed by the code under test). Every field a
config file can set has a docstring, read here from the source with `ast` (independently of
pydantic's own extraction, which is checked against it).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

import llama_train.config
from llama_model import LlamaConfig, RopeScaling
from llama_train.cli import main
from llama_train.config import ModelConfig, SourceConfig, TrainConfig
from llama_train.schedules import BatchStage

M = 2**20  # the paper's batch sizes are binary: "4M tokens" = 1,024 sequences of 4,096 tokens


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and TOML


def test_defaults_validate() -> None:
    """With no file and no overrides the defaults form a valid, self-consistent config."""
    config = TrainConfig.load()
    assert config == TrainConfig()
    assert config.model.preset == "debug"
    assert config.steps == 100
    assert config.optimizer.warmup_steps < config.steps
    assert config.lr_schedule().total_steps == config.steps


def test_toml_file_is_loaded(tmp_path: Path) -> None:
    """Sections, nested tables and arrays of tables in the TOML file reach the config."""
    path = _write(
        tmp_path,
        """
steps = 40
out_dir = "runs/a"

[optimizer]
peak_lr = 1e-3
final_lr = 1e-4
warmup_steps = 5

[model]
preset = "debug"
overrides = { max_seq_len = 512 }

[data]
seed = 7

[[data.sources]]
path = "shards/web"
weight = 3.0

[[data.sources]]
path = "shards/code"
name = "code"

[[data.ramp]]
tokens_seen_threshold = 0
batch_tokens = 1024
seq_len = 128

[[data.ramp]]
tokens_seen_threshold = 5000
batch_tokens = 4096
seq_len = 512

[parallel]
tp = 2
pp_schedule = "GPipe"
""",
    )
    config = TrainConfig.load(path)
    assert config.steps == 40
    assert config.out_dir == Path("runs/a")
    assert (config.optimizer.peak_lr, config.optimizer.final_lr) == (1e-3, 1e-4)
    assert config.optimizer.warmup_steps == 5
    assert config.model.llama_config().max_seq_len == 512
    assert config.data.seed == 7
    assert [(s.label, s.weight) for s in config.data.sources] == [("web", 3.0), ("code", 1.0)]
    assert config.data.sources[0].path == Path("shards/web")
    assert config.data.batch_ramp().at(0) == (1024, 128)
    assert config.data.batch_ramp().at(5000) == (4096, 512)
    assert (config.parallel.tp, config.parallel.pp_schedule) == (2, "GPipe")
    assert config.optimizer.eps == 1e-5  # untouched fields keep their defaults


def test_lr_schedule_ends_where_annealing_starts() -> None:
    """The warmup + cosine schedule reaches final_lr at steps - anneal.steps (§3.4.3 takes over)."""
    config = TrainConfig.load(None, ["steps=100", "anneal.steps=20", "optimizer.warmup_steps=10"])
    schedule = config.lr_schedule()
    assert schedule.total_steps == 80
    assert schedule.lr(10) == pytest.approx(2e-3, rel=1e-12)
    assert schedule.lr(45) == pytest.approx((2e-3 + 2e-4) / 2, rel=1e-12)
    assert schedule.lr(80) == pytest.approx(2e-4, rel=1e-12)


def test_without_ramp_every_step_is_batch_size_by_seq_len() -> None:
    """Without `data.ramp` the batch is `batch_size` sequences of `seq_len` at any token count."""
    config = TrainConfig.load(None, ["data.batch_size=6", "data.seq_len=32"])
    ramp = config.data.batch_ramp()
    assert ramp.at(0) == (6 * 32, 32)
    assert ramp.at(10**15) == (6 * 32, 32)


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("steps=250", ("steps",), 250),
        ("optimizer.peak_lr=3e-4", ("optimizer", "peak_lr"), 3e-4),
        ("optimizer.betas=[0.8, 0.99]", ("optimizer", "betas"), (0.8, 0.99)),
        ("activation_checkpointing=true", ("activation_checkpointing",), True),
        ("spikes.enabled=false", ("spikes", "enabled"), False),
        ('dtype="bfloat16"', ("dtype",), "bfloat16"),
        ("device=cpu", ("device",), "cpu"),  # not a TOML literal: taken as the raw string
        ("parallel.pp_layers_per_stage=[1, 2, 1]", ("parallel", "pp_layers_per_stage"), (1, 2, 1)),
        ("model.overrides={max_seq_len = 512, n_layers = 2}", ("model", "overrides"),
         {"max_seq_len": 512, "n_layers": 2}),
        ("model.overrides.max_seq_len=1024", ("model", "overrides"), {"max_seq_len": 1024}),
        ("logging.peak_tflops=989.5", ("logging", "peak_tflops"), 989.5),
    ],
)  # fmt: skip
def test_override_values_are_parsed_as_toml(
    override: str, field: tuple[str, ...], expected: object
) -> None:
    """A dotted override's value is a TOML literal: number, bool, string, array, inline table."""
    value: object = TrainConfig.load(None, [override])
    for part in field:
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_override_inline_tables_make_sources() -> None:
    """`data.sources=[{...}, {...}]` gives a list of sources with their fields."""
    config = TrainConfig.load(
        None, ['data.sources=[{path="d/web", weight=2.5}, {path="d/code", name="py"}]']
    )
    assert config.data.sources == (
        SourceConfig(path=Path("d/web"), weight=2.5),
        SourceConfig(path=Path("d/code"), name="py"),
    )


def test_precedence_cli_over_toml_over_defaults(tmp_path: Path) -> None:
    """An override beats the file, the file beats the defaults, and siblings are kept (merge)."""
    path = _write(
        tmp_path,
        """
steps = 40
[optimizer]
peak_lr = 1e-3
warmup_steps = 5
""",
    )
    config = TrainConfig.load(path, ["optimizer.peak_lr=5e-4", "seed=3"])
    assert config.optimizer.peak_lr == 5e-4  # CLI over TOML
    assert config.optimizer.warmup_steps == 5  # TOML sibling of an overridden key is kept
    assert config.steps == 40  # TOML over default (100)
    assert config.seed == 3  # CLI over default
    assert config.optimizer.final_lr == 2e-4  # default, set nowhere else
    assert TrainConfig.load(path).optimizer.peak_lr == 1e-3


def test_later_override_wins() -> None:
    """When the same key is overridden twice, the last one applies."""
    assert TrainConfig.load(None, ["steps=20", "steps=30"]).steps == 30


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.peak_lrr=1e-3", "optimizer.peak_lrr"),
        ("optimiser.peak_lr=1e-3", "optimiser"),
        ("bogus=3", "bogus"),
        ("data.sources=[{path='x', wieght=2}]", "wieght"),
    ],
)
def test_unknown_keys_are_rejected_by_name(override: str, named: str) -> None:
    """A misspelt key or section is an error that names it (never silently dropped)."""
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as info:
        TrainConfig.load(None, [override])
    assert named in str(info.value)


def test_unknown_key_in_toml_is_rejected_by_name(tmp_path: Path) -> None:
    """An unknown key in a TOML section is an error naming the section and the key."""
    path = _write(tmp_path, "[checkpoint]\nintervall = 5\n")
    with pytest.raises(ValidationError, match=r"checkpoint\.intervall"):
        TrainConfig.load(path)


@pytest.mark.parametrize("override", ["steps", "=5", "  "])
def test_malformed_override_is_rejected(override: str) -> None:
    """An override without `key=` is an error that shows the expected form."""
    with pytest.raises(ValueError, match=r"must look like section\.key=value"):
        TrainConfig.load(None, [override])


def test_override_below_a_value_is_rejected(tmp_path: Path) -> None:
    """`steps.x=1` when `steps` is a value is an error naming the key."""
    path = _write(tmp_path, "steps = 10\n")
    with pytest.raises(ValueError, match=r"'steps' is a value, not a section"):
        TrainConfig.load(path, ["steps.x=1"])


def test_override_without_value_names_the_key() -> None:
    """`optimizer.peak_lr` without `=` is an error naming the key and showing how to write it."""
    with pytest.raises(ValueError) as info:
        TrainConfig.load(None, ["optimizer.peak_lr"])
    assert str(info.value).startswith("optimizer.peak_lr: no value;")
    assert "write optimizer.peak_lr=<value>" in str(info.value)


# ---------------------------------------------------------------- docstrings


def _attribute_docstrings(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> the string literal right below its annotation in `cls`'s own source."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    found: dict[str, str] = {}
    for statement, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[statement.target.id] = inspect.cleandoc(after.value.value)
    return found


def _undocumented(cls: type[BaseModel]) -> list[str]:
    documented = _attribute_docstrings(cls)
    return [name for name in cls.model_fields if not documented.get(name, "").strip()]


def _sections() -> list[type[BaseModel]]:
    """Every model `llama_train.config` defines that a TrainConfig's TOML reaches."""
    seen: list[type[BaseModel]] = []
    todo: list[Any] = [TrainConfig]
    while todo:
        annotation = todo.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen and annotation.__module__ == llama_train.config.__name__:
                seen.append(annotation)
                todo.extend(f.annotation for f in annotation.model_fields.values())
        else:
            todo.extend(get_args(annotation))
    return seen


def test_every_section_is_found() -> None:
    """The walk over TrainConfig's annotations finds each exported section (so the docstring test
    below covers them all)."""
    expected = {getattr(llama_train.config, name) for name in llama_train.config.__all__}
    assert set(_sections()) == expected


@pytest.mark.parametrize("section", _sections(), ids=lambda s: s.__name__)
def test_every_train_config_field_has_a_docstring(section: type[BaseModel]) -> None:
    """Each field of each TrainConfig section has an attribute docstring, and pydantic exposes it
    as the field's description (use_attribute_docstrings), e.g. in the JSON schema."""
    assert _undocumented(section) == []
    for name, docstring in _attribute_docstrings(section).items():
        assert section.model_fields[name].description == docstring, name


@pytest.mark.parametrize("config", [LlamaConfig, RopeScaling, BatchStage], ids=lambda c: c.__name__)
def test_configs_reached_from_a_train_config_are_documented(config: type[BaseModel]) -> None:
    """The models a TrainConfig's TOML reaches outside this module (`model.overrides` sets
    LlamaConfig fields, `data.ramp` holds BatchStages) document every field too."""
    assert _undocumented(config) == []


def test_undocumented_field_is_detected() -> None:
    """Negative control: a field without a docstring is reported by name."""

    class Partly(BaseModel):
        documented: int = 1
        """Has one."""
        bare: int = 2

    assert _undocumented(Partly) == ["bare"]


# ---------------------------------------------------------------- the attention kernel


@pytest.mark.parametrize("kernel", ["auto", "dense", "flex"])
def test_attention_kernel_accepts_its_three_values(kernel: str) -> None:
    """`model.attention_kernel` takes "auto", "dense" and "flex", from an override or a file."""
    config = TrainConfig.load(None, [f'model.attention_kernel="{kernel}"'])
    assert config.model.attention_kernel == kernel


def test_attention_kernel_defaults_to_auto_and_rejects_others() -> None:
    """The default is "auto"; any other name (the old environment variable's "sdpa") is rejected
    naming the key and the valid values."""
    assert ModelConfig().attention_kernel == "auto"
    assert TrainConfig().model.attention_kernel == "auto"
    with pytest.raises(ValidationError) as info:
        TrainConfig.load(None, ['model.attention_kernel="sdpa"'])
    assert "model.attention_kernel" in str(info.value)
    assert "'auto', 'dense' or 'flex'" in str(info.value)


# ---------------------------------------------------------------- cross-field validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["steps=50", "anneal.steps=50"], r"anneal.steps \(50\) must be smaller than steps \(50\)"),
        (["steps=50", "anneal.steps=80"], r"anneal.steps \(80\) must be smaller than steps \(50\)"),
        (["steps=20", "optimizer.warmup_steps=20"],
         r"optimizer.warmup_steps \(20\) must be smaller than steps - anneal.steps \(20 - 0\)"),
        (["optimizer.peak_lr=1e-4", "optimizer.final_lr=2e-4"],
         r"optimizer.final_lr \(0.0002\) exceeds optimizer.peak_lr \(0.0001\)"),
        (["data.seq_len=4096"],
         r"data sequence length 4096 exceeds the model's max_seq_len 2048"),
        (["model.overrides={max_seq_len=128}", "data.seq_len=256"],
         r"data sequence length 256 exceeds the model's max_seq_len 128"),
        (["data.ramp=[{tokens_seen_threshold=0, batch_tokens=256, seq_len=128}, "
          "{tokens_seen_threshold=1000, batch_tokens=8192, seq_len=4096}]"],
         r"data sequence length 4096 exceeds the model's max_seq_len 2048"),
        (['model.preset="llama4-1t"'], r"unknown model preset 'llama4-1t'; valid: .*debug"),
        (['data.sources=[{path="a/web"}, {path="b/web"}]'],
         r"data.sources names must be unique, got \['web', 'web'\]; set `name`"),
        (['data.sources=[{path="a", name="x"}, {path="b", name="x"}]'],
         r"data.sources names must be unique"),
    ],
)  # fmt: skip
def test_cross_field_validators_explain(overrides: list[str], message: str) -> None:
    """Each inconsistent combination is rejected with a message naming the fields and values."""
    with pytest.raises(ValidationError, match=message):
        TrainConfig.load(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["steps=50", "anneal.steps=49", "optimizer.warmup_steps=0"],
        ["steps=20", "optimizer.warmup_steps=19"],
        ["optimizer.peak_lr=1e-4", "optimizer.final_lr=1e-4"],
        ["data.seq_len=2048"],
        ["model.overrides={max_seq_len=4096}", "data.seq_len=4096"],
        ['data.sources=[{path="a/web"}, {path="b/web", name="web2"}]'],
    ],
)
def test_boundary_values_just_inside_are_accepted(overrides: list[str]) -> None:
    """The validators reject only what is inconsistent: the value at each boundary is fine."""
    TrainConfig.load(None, overrides)


def test_warmup_must_end_before_annealing() -> None:
    """A warmup that does not end before annealing starts is rejected at load, naming the field."""
    with pytest.raises(ValidationError, match=r"optimizer\.warmup_steps"):
        TrainConfig.load(None, ["steps=100", "anneal.steps=50", "optimizer.warmup_steps=60"])


def test_ramp_and_fixed_batch_shape_must_agree() -> None:
    """With a ramp, data.batch_size/seq_len may only restate its first stage (else they would be
    silently ignored): a disagreement is an error naming both."""
    ramp = "data.ramp=[{tokens_seen_threshold=0, batch_tokens=64, seq_len=16}]"
    TrainConfig.load(None, [ramp])
    TrainConfig.load(None, [ramp, "data.seq_len=16", "data.batch_size=4"])
    with pytest.raises(ValidationError, match=r"data.seq_len=32 disagree with data.ramp's first"):
        TrainConfig.load(None, [ramp, "data.seq_len=32"])


def test_pipeline_schedule_and_split_are_checked_at_load() -> None:
    """Pipeline settings that cannot run fail when the config is read, not after the processes
    and the model were built."""
    with pytest.raises(ValidationError, match="1F1B"):
        TrainConfig.load(None, ["parallel.pp=4", "parallel.pp_microbatches=2"])
    with pytest.raises(ValidationError, match="sums to 3 but the model has n_layers=4"):
        TrainConfig.load(None, ["parallel.pp=2", "parallel.pp_layers_per_stage=[1, 2]"])
    TrainConfig.llama3_405b()  # the paper's layout validates


def test_duplicate_anneal_source_names_are_rejected() -> None:
    """Duplicate `anneal.sources` names are rejected at load like duplicate `data.sources`."""
    with pytest.raises(ValidationError, match="unique"):
        TrainConfig.load(None, ["anneal.steps=10", 'anneal.sources=[{path="a/x"}, {path="b/x"}]'])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optimizer.peak_lr=0", "optimizer.peak_lr"),
        ("steps=0", "steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.sources=[{path='a', weight=0}]", "data.sources.0.weight"),
        ('dtype="float16"', "dtype"),
        ('parallel.pp_schedule="ZeroBubble"', "parallel.pp_schedule"),
    ],
)
def test_field_constraints_name_the_field(override: str, field: str) -> None:
    """A value outside a field's range is rejected with the field's dotted path."""
    with pytest.raises(ValidationError) as info:
        TrainConfig.load(None, [override])
    assert field in str(info.value)


# ---------------------------------------------------------------- the 405B recipe (§3.4.1)


def test_llama3_405b_lr_schedule_matches_the_paper() -> None:
    """Peak 8e-5 after 8,000 linear warmup steps, cosine to 8e-7 at 1,200,000 steps."""
    config = TrainConfig.llama3_405b()
    assert config.steps == 1_200_000
    assert config.model.preset == "llama3.1-405b"
    assert config.dtype == "bfloat16"
    schedule = config.lr_schedule()
    assert schedule.lr(0) == 0.0
    assert schedule.lr(4_000) == pytest.approx(4e-5, rel=1e-12)
    assert schedule.lr(8_000) == pytest.approx(8e-5, rel=1e-12)
    # halfway through the cosine: the mean of peak and final
    assert schedule.lr(8_000 + 596_000) == pytest.approx((8e-5 + 8e-7) / 2, rel=1e-12)
    # a quarter of the way: final + (peak - final) * (1 + cos(pi / 4)) / 2
    quarter = 8e-7 + (8e-5 - 8e-7) * (1 + math.sqrt(0.5)) / 2
    assert schedule.lr(8_000 + 298_000) == pytest.approx(quarter, rel=1e-12)
    assert schedule.lr(1_200_000) == pytest.approx(8e-7, rel=1e-12)
    assert schedule.lr(1_500_000) == pytest.approx(8e-7, rel=1e-12)


def test_llama3_405b_batch_ramp_matches_the_paper() -> None:
    """4M tokens of 4,096-token sequences; 8M of 8,192 after 252M tokens; 16M after 2.87T."""
    ramp = TrainConfig.llama3_405b().data.batch_ramp()
    assert ramp.at(0) == (1_024 * 4_096, 4_096)
    assert ramp.at(0) == (4 * M, 4_096)
    assert ramp.at(251_999_999) == (4 * M, 4_096)
    assert ramp.at(252_000_000) == (8 * M, 8_192)
    assert ramp.at(2_869_999_999_999) == (8 * M, 8_192)
    assert ramp.at(2_870_000_000_000) == (16 * M, 8_192)
    assert ramp.at(15_000_000_000_000) == (16 * M, 8_192)  # the whole 15T-token corpus


def test_llama3_405b_keeps_its_sources() -> None:
    """`llama3_405b(sources)` keeps the given sources in the data mixture."""
    sources = [SourceConfig(path=Path("web"), weight=0.5), SourceConfig(path=Path("code"))]
    assert TrainConfig.llama3_405b(sources).data.sources == tuple(sources)


# ---------------------------------------------------------------- CLI


def test_cli_print_config_reflects_file_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--print-config` prints the resolved config as JSON, overrides over file, and exits 0."""
    path = _write(tmp_path, "steps = 40\n[optimizer]\npeak_lr = 1e-3\nwarmup_steps = 5\n")
    code = main(
        [
            "--config",
            str(path),
            "optimizer.peak_lr=5e-4",
            "parallel.tp=2",
            'data.sources=[{path="shards/web", weight=2.0}]',
            "--print-config",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["peak_lr"] == 5e-4
    assert printed["optimizer"]["warmup_steps"] == 5
    assert printed["steps"] == 40
    assert printed["parallel"]["tp"] == 2
    assert printed["seed"] == 0
    assert printed["data"]["sources"] == [{"path": "shards/web", "weight": 2.0}]
    assert TrainConfig.model_validate(printed) == TrainConfig.load(
        path,
        [
            "optimizer.peak_lr=5e-4",
            "parallel.tp=2",
            'data.sources=[{path="shards/web", weight=2.0}]',
        ],
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["optimizer.peak_lr=-1"], "optimizer.peak_lr"),
        (["optimizer.peak_lrr=1e-3"], "optimizer.peak_lrr"),
        (["steps=10", "optimizer.warmup_steps=10"], "optimizer.warmup_steps"),
        (["steps"], "must look like section.key=value"),
    ],
)
def test_cli_invalid_config_exits_2_naming_the_field(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid config returns exit code 2 and a message on stderr naming the field."""
    assert main([*argv, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "llama-train: invalid configuration" in captured.err
    assert named in captured.err


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines `llama-train` prints for an invalid config, after checking exit code and header."""
    assert main([*argv, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    header, *lines = captured.err.splitlines()
    assert header == "llama-train: invalid configuration:"
    for noise in ("pydantic.dev", "[type=", "Extra inputs are not permitted", "Value error,"):
        assert noise not in captured.err
    return lines


def test_cli_unknown_key_suggests_and_lists_valid_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`optimizer.lr=-1` names the key, suggests peak_lr and lists the optimizer's keys, without
    pydantic's URL."""
    assert _cli_error(["optimizer.lr=-1"], capsys) == [
        "  optimizer.lr: unknown key; did you mean 'peak_lr'? valid keys: peak_lr, final_lr, "
        "warmup_steps, betas, eps, weight_decay, max_grad_norm"
    ]


def test_cli_unknown_section_suggests_the_section(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt section is suggested among the top-level keys, which are listed."""
    (line,) = _cli_error(["optimiser.peak_lr=1e-3"], capsys)
    assert line.startswith("  optimiser: unknown key; did you mean 'optimizer'? valid keys: model,")
    assert line.endswith(", compile, export")


def test_cli_bad_value_names_key_and_value(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative learning rate names the key, the value and the bound."""
    assert _cli_error(["optimizer.peak_lr=-1"], capsys) == [
        "  optimizer.peak_lr = -1: must be greater than 0"
    ]


def test_cli_unknown_key_in_a_source_is_named_by_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt key in the second [[data.sources]] table of a file: `data.sources[1].paht`."""
    path = _write(tmp_path, '[[data.sources]]\npath = "a"\n[[data.sources]]\npaht = "b"\n')
    assert _cli_error(["--config", str(path)], capsys) == [
        "  data.sources[1].path: missing; this key is required",
        "  data.sources[1].paht: unknown key; did you mean 'path'? valid keys: path, weight, name",
    ]


def test_cli_our_validator_message_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    """A cross-field error keeps TrainConfig's own message, which names the fields."""
    assert _cli_error(["steps=10", "optimizer.warmup_steps=10"], capsys) == [
        "  optimizer.warmup_steps (10) must be smaller than steps - anneal.steps (10 - 0): "
        "warmup and the cosine decay come before annealing"
    ]


def test_cli_unknown_model_override_lists_llama_config_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown LlamaConfig field in model.overrides is named where the user wrote it, with
    LlamaConfig's fields as the valid keys."""
    fields = ", ".join(LlamaConfig.model_fields)
    assert _cli_error(["model.overrides.n_layerz=2"], capsys) == [
        f"  model.overrides.n_layerz: unknown key; did you mean 'n_layers'? valid keys: {fields}"
    ]
    with pytest.raises(ValidationError, match=r"model\.overrides\.n_layerz: unknown key"):
        TrainConfig.load(None, ["model.overrides.n_layerz=2"])


def test_cli_override_without_value(capsys: pytest.CaptureFixture[str]) -> None:
    """An override without `=` is reported in the same form: the key, then what to write."""
    assert _cli_error(["optimizer.peak_lr"], capsys) == [
        "  optimizer.peak_lr: no value; an override must look like section.key=value "
        "(a TOML value): write optimizer.peak_lr=<value>"
    ]


def test_cli_missing_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config path that does not exist returns 2 with a message naming the path."""
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "--print-config"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_malformed_toml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TOML syntax error returns 2 with a message, not a traceback."""
    path = _write(tmp_path, "[optimizer\npeak_lr = \n")
    assert main(["--config", str(path), "--print-config"]) == 2
    assert "invalid configuration" in capsys.readouterr().err
