"""`llama-train`: run a pretraining job from a TOML config, in one process or under torchrun.

    llama-train --config run.toml
    llama-train --config run.toml optimizer.peak_lr=3e-4 steps=2000
    torchrun --nproc-per-node 8 -m llama_train.cli --config run.toml parallel.tp=2

Overrides are ``section.key=value`` with TOML values; they win over the file, which wins over the
defaults. `--print-config` shows the resolved config and exits. An invalid config exits with code 2
and one line per problem (`llama_model.format_validation_error`): the key, the offending value, and
for an unknown key the closest valid one and the valid keys of its section.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import tomllib
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from llama_model import format_validation_error
from llama_train.config import TrainConfig, config_as_toml_dict

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-train`."""
    parser = argparse.ArgumentParser(
        prog="llama-train", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--config", type=Path, help="TOML file (sections as in TrainConfig)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (TOML values)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.load(args.config, args.overrides)
    except ValidationError as error:
        return _invalid(format_validation_error(error, TrainConfig))
    except tomllib.TOMLDecodeError as error:
        return _invalid(f"  {args.config}: not valid TOML: {error}")
    except OSError as error:
        return _invalid(f"  {error.filename or args.config}: {error.strerror or error}")
    except ValueError as error:  # an override that is not key=value: TrainConfig.load says which
        return _invalid(textwrap.indent(str(error), "  "))
    if args.print_config:
        print(json.dumps(config_as_toml_dict(config), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from llama_train.trainer import Trainer  # torch and friends only once the config is valid

    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if dist.is_initialized():  # under torchrun: leave together, then release the group
        dist.barrier()
        dist.destroy_process_group()
    if trainer.rank == 0:
        last = result.losses[max(result.losses)] if result.losses else float("nan")
        print(
            f"llama-train: {result.steps} steps, last loss {last:.4f}, "
            f"{len(result.skipped)} skipped, {len(result.rollbacks)} rollbacks; "
            f"model: {result.exported}"
        )
    return 0


def _invalid(lines: str) -> int:
    """Report a rejected config on stderr; exit code 2, like argparse's usage errors."""
    print(f"llama-train: invalid configuration:\n{lines}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
