"""Start `llama-serve serve` as a real process on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from llama_model import Llama, LlamaConfig, Tokenizer, save_checkpoint

STARTUP_SECONDS = 180.0  # loading torch and the model; generous for a loaded 2-core CI machine


def tiny_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A random 2-layer model with Llama 3's vocabulary and tokenizer, saved as a HF directory."""
    config = LlamaConfig.model_validate({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "multiple_of": 32, "max_seq_len": 512})  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(config)
    model.init_weights(seed=seed, std=0.1)
    save_checkpoint(model, path, tokenizer=Tokenizer.llama3())
    return path


@contextlib.contextmanager
def serve(checkpoint: Path, *args: str, log: Path) -> Iterator[str]:
    """Run `llama-serve serve CHECKPOINT --port 0 ARGS` and yield its base URL ("http://...:PORT");
    the process is stopped on exit. Its log (uvicorn's) goes to `log`."""
    command: Sequence[str] = [
        sys.executable, "-m", "llama_serve.cli", "serve", str(checkpoint),
        "--host", "127.0.0.1", "--port", "0", "--dtype", "float32", "--log-level", "warning",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Both streams go to the log (a pipe nobody reads after start-up would fill and block a
    # chatty server); the URL line is read from the log.
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            yield _wait_for_url(process, log)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_url(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(
            r"llama-serve serve: \S+ on (http://\S+?)/v1", log.read_text(errors="replace")
        )
        if match:
            return match[1]
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-4000:]}")
