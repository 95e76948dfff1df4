"""`llama-serve`: the serving package's command line.

`llama-serve quantize SRC DST [--no-skip-first-last] [--scale-ub 1200]` loads the checkpoint SRC
(Hugging Face or Meta layout) in bf16, applies §6.2's FP8 recipe (`llama_serve.quantize_fp8`) and
writes DST in the `fbgemm_fp8` layout of Llama 3.1 405B Instruct FP8
(`llama_serve.fp8_checkpoint`), with SRC's tokenizer files and `generation_config.json` copied
as they are. A thin entry point: parse, load, quantize, save; the logic lives in the library.
Usage errors (bad arguments, SRC not a checkpoint, DST = SRC) exit with 2, like argparse's; a
checkpoint the library refuses exits with 1; each error is one line naming the value.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from llama_kernels import SCALE_UB, Fp8RowwiseLinear

__all__ = ["main"]

PROG = "llama-serve"

# Files of a source checkpoint that the quantized one keeps as they are: the tokenizer in the
# Hugging Face layout (tokenizer.json, its config and special tokens, a chat template file) or in
# Meta's (tokenizer.model), and the sampling defaults and stop ids (generation_config.json).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-serve`; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quantize = commands.add_parser(
        "quantize",
        help="write an FP8 (fbgemm_fp8) checkpoint with §6.2's recipe",
        description="Quantize the feed-forward layers of checkpoint SRC to FP8 (§6.2 of the "
        "Llama 3 paper) and write DST in the layout of Llama 3.1 405B Instruct FP8.",
    )
    quantize.add_argument("src", type=Path, metavar="SRC", help="checkpoint directory to read")
    quantize.add_argument("dst", type=Path, metavar="DST", help="checkpoint directory to write")
    quantize.add_argument(
        "--no-skip-first-last",
        dest="skip_first_last",
        action="store_false",
        help="quantize the first and the last layer too (§6.2 keeps them in bf16)",
    )
    quantize.add_argument(
        "--scale-ub",
        type=float,
        default=SCALE_UB,
        metavar="UB",
        help=f"upper bound on the dynamic activation scales (default: §6.2's {SCALE_UB:g})",
    )
    args = parser.parse_args(argv)
    return _quantize(
        args.src, args.dst, skip_first_last=args.skip_first_last, scale_ub=args.scale_ub
    )


def _quantize(src: Path, dst: Path, *, skip_first_last: bool, scale_ub: float) -> int:
    if not (src / "config.json").is_file() and not (src / "params.json").is_file():
        return _usage(
            f"SRC {str(src)!r} is not a checkpoint directory (no config.json or params.json)"
        )
    if dst.resolve() == src.resolve():
        return _usage(f"DST {str(dst)!r} is SRC: write the FP8 checkpoint to another directory")
    if not (scale_ub > 0 and math.isfinite(scale_ub)):
        return _usage(
            f"--scale-ub must be a finite number > 0 (§6.2 uses {SCALE_UB:g}), got {scale_ub}"
        )

    import torch  # only once the arguments are valid

    from llama_model import load_checkpoint
    from llama_serve.fp8 import quantize_fp8
    from llama_serve.fp8_checkpoint import is_fp8_checkpoint, save_fp8_checkpoint

    try:
        if is_fp8_checkpoint(src):
            return _usage(f"SRC {str(src)!r} is already an FP8 checkpoint")
        model = load_checkpoint(src, dtype=torch.bfloat16)
        quantize_fp8(model, skip_first_last=skip_first_last, scale_ub=scale_ub)
        copies = [src / name for name in COPIED_FILES if (src / name).is_file()]
        save_fp8_checkpoint(model, dst, copy_files=copies)
    except FileExistsError as error:  # DST is a file, or a directory holding something else
        return _usage(str(error))
    except (OSError, ValueError, TypeError) as error:
        print(f"{PROG} quantize: error: {error}", file=sys.stderr)
        return 1
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    n_fp8 = sum(isinstance(m, Fp8RowwiseLinear) for m in model.modules())
    print(
        f"{PROG} quantize: wrote {dst}: {n_fp8} linear layers in FP8, {n_linear} in bf16, "
        f"activation_scale_ub={scale_ub:g}; copied {', '.join(p.name for p in copies) or 'nothing'}"
    )
    return 0


def _usage(message: str) -> int:
    """A usage error on stderr, one line; exit code 2, like argparse's."""
    print(f"{PROG} quantize: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
