"""`llama-align`: run one post-training stage, or a whole round, from a TOML config.

    llama-align sft --config sft.toml
    llama-align dpo --config dpo.toml beta=0.2 train.steps=500
    llama-align round --config round.toml out=runs/round2
    accelerate launch --cpu --num_processes 2 -m llama_align.cli sft --config sft.toml

Stages: sft, rm, sample, dpo, average, round (`llama_align.config` documents every field).
Overrides are ``key.sub=value`` with TOML values; they win over the file, which wins over the
defaults. `--print-config` shows the resolved config and exits. An invalid config exits with code 2
and one line per problem (the key, the offending value, and for an unknown key the closest valid
one). A stage whose output directory is complete is skipped; a killed one resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llama_align.config import (
    AverageConfig,
    DpoConfig,
    RewardConfig,
    RoundConfig,
    SampleConfig,
    SftConfig,
)
from llama_model import format_validation_error, load_config

__all__ = ["main", "STAGES"]

STAGES: dict[str, tuple[type[BaseModel], str]] = {
    "sft": (SftConfig, "run_sft"),
    "rm": (RewardConfig, "run_rm"),
    "sample": (SampleConfig, "run_sample"),
    "dpo": (DpoConfig, "run_dpo"),
    "average": (AverageConfig, "run_average"),
    "round": (RoundConfig, "run_round"),
}
"""{command: (its config class, the `llama_align.stages` function that runs it)}."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-align`."""
    parser = argparse.ArgumentParser(
        prog="llama-align", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("stage", choices=list(STAGES), help="what to run")
    parser.add_argument("--config", type=Path, help="TOML file (fields as in llama_align.config)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (TOML values)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)
    config_class, runner_name = STAGES[args.stage]
    try:
        config = load_config(config_class, args.config, args.overrides)
    except ValidationError as error:
        return _invalid(args.stage, format_validation_error(error, config_class))
    except tomllib.TOMLDecodeError as error:
        return _invalid(args.stage, f"  {args.config}: not valid TOML: {error}")
    except OSError as error:
        return _invalid(args.stage, f"  {error.filename or args.config}: {error.strerror or error}")
    except ValueError as error:
        return _invalid(args.stage, textwrap.indent(str(error), "  "))
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from llama_align import stages  # torch and friends only once the config is valid
    from llama_align.data import DataError

    runner: Callable[[Any], Path] = getattr(stages, runner_name)
    try:
        out = runner(config)
    except DataError as error:  # no usable row, a missing file: the message says which
        print(f"llama-align {args.stage}: {error}", file=sys.stderr)
        return 1
    record = json.loads((out / stages.STAGE_FILE).read_text())
    print(f"llama-align {args.stage}: done -> {out}")
    print(json.dumps(record.get("results", {}), indent=2))
    return 0


def _invalid(stage: str, lines: str) -> int:
    """Report a rejected config on stderr; exit code 2, like argparse's usage errors."""
    print(f"llama-align {stage}: invalid configuration:\n{lines}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
