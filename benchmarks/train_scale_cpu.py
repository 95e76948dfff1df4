"""What do llama-train's scale-out changes buy: data read per rank, and memory to start and export?

Three measurements, each against the way llama-train did it before (2da79ad and earlier), in the
same run:

1. **Data per data-parallel rank.** `BatchLoader` now reads only this rank's rows of the global
   batch and passes over the other ranks' windows by their document lengths
   (`WindowStream.skip`). The "read all" side is the same loader made to read every window of the
   global batch and keep its rows (the old behaviour). Reported: the median time of one
   `next_batch()` on rank 0 and the windows it reads, for dp = 1, 8 and 32 ranks at a fixed
   global batch.
2. **Start-up memory.** The `Trainer` now builds the model on the meta device and each rank
   materialises only its shards (`llama_model.init_parameters`). The old way built and
   initialised the whole model on every rank before sharding. Measured here as the peak resident
   memory of a fresh process that does what rank 0 of an FSDP group of 8 does, both ways, and
   ends holding rank 0's shards (FSDP2's row chunks, `torch.chunk(param, 8)[0]`): build, initialise
   and chunk the whole model (before), or build on meta and generate one full parameter at a time
   with `llama_model.initial_parameter`, keeping its chunk (now; the process-group plumbing of
   `fully_shard` is left out of both).
3. **Export memory.** `Trainer.export` now streams the Polyak average (`CheckpointAverage`, a
   group of tensors at a time) into `save_checkpoint(load_weight=...)`. The old way averaged whole
   checkpoints (`average_checkpoints`), loaded the result into a model and saved it. Peak resident
   memory of a fresh process doing each, over two DCP checkpoints of the same model.

Peak memory is `ru_maxrss` of a child process (Linux: KiB), the median of 3 processes, so each
side starts from an empty interpreter with torch imported; the table also gives the model's float32 size for scale.

Run: ``uv run python benchmarks/train_scale_cpu.py [--json PATH]``. Defaults write
``benchmarks/results/train_scale_cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench_common import cpu_name, timed
from llama_data import Document, write_token_shards
from llama_model import LlamaConfig, count_parameters
from llama_train import BatchRamp, BatchStage
from llama_train.data import BatchLoader, DataSource

# A model big enough that whole-model copies dominate the interpreter (about 0.9 GB in float32),
# small enough for the old export path (about 4 copies) to fit this 24 GiB machine.
MODEL = {"dim": 1024, "n_layers": 8, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 32_000,
         "multiple_of": 256, "max_seq_len": 2048, "tie_word_embeddings": False}  # fmt: skip


class _Bytes:
    """Bytes as tokens: enough for shards of pseudo-text."""

    name = "bytes"
    sha256 = hashlib.sha256(b"UTF-8 bytes as token ids, vocabulary 256").hexdigest()
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class _ReadAllLoader(BatchLoader):
    """The old behaviour: every window of the global batch is read, then this rank's kept."""

    def _take(self, index: int, count: int, *, read: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        windows = super()._take(index, count, read=True)
        return windows if read else []


def loader_rows(shards_dir: Path, repeats: int) -> list[dict[str, object]]:
    from llama_data import TokenShards, WindowStream

    rows: list[dict[str, object]] = []
    seq_len, batch_rows = 2048, 64
    ramp = BatchRamp(stages=(BatchStage(tokens_seen_threshold=0, batch_tokens=batch_rows * seq_len,
                                        seq_len=seq_len),))  # fmt: skip
    reads = 0
    original = WindowStream.__next__

    def counting(self: WindowStream) -> tuple[np.ndarray, np.ndarray]:
        nonlocal reads
        window = original(self)
        reads += 1
        return window

    WindowStream.__next__ = counting  # type: ignore[method-assign]
    try:
        for dp in (1, 8, 32):
            for name, cls in (("skip (now)", BatchLoader), ("read all (before)", _ReadAllLoader)):
                loader = cls([DataSource("web", TokenShards(shards_dir))], ramp, seed=0,
                             dp_rank=0, dp_size=dp)  # fmt: skip
                reads = 0
                loader.next_batch()
                per_step = reads
                seconds = timed(loader.next_batch, repeats)
                rows.append({"what": "BatchLoader.next_batch, rank 0", "dp": dp, "impl": name,
                             "ms": seconds * 1e3, "windows_read_per_step": per_step,
                             "global_batch": f"{batch_rows}x{seq_len}"})  # fmt: skip
    finally:
        WindowStream.__next__ = original  # type: ignore[method-assign]
    return rows


_CHILD_PRELUDE = """
import json, resource, sys, warnings
import torch
from llama_model import Llama, LlamaConfig
config = LlamaConfig.model_validate(json.loads(sys.argv[1]))
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_START_FULL = """
model = Llama(config)  # the old way: the whole model on every rank, then sharded
model.init_weights(seed=0)
shards = {n: torch.chunk(p.detach(), 8)[0].clone() for n, p in model.named_parameters()}
del model
print(json.dumps({"peak_MiB": peak_mib()}))
"""

_START_META = """
from llama_model.initialization import initial_parameter
with torch.device("meta"):
    model = Llama(config)
# What `init_parameters` does on rank 0 of 8 after fully_shard: one full parameter generated at a
# time, its row chunk kept (FSDP2 shards dim 0 with torch.chunk).
shards = {}
for name, p in model.named_parameters():
    full = initial_parameter(config, name, p.shape, seed=0)
    shards[name] = torch.chunk(full, 8)[0].clone()
    del full
print(json.dumps({"peak_MiB": peak_mib()}))
"""

_EXPORT_WHOLE = """
from pathlib import Path
from llama_model import save_checkpoint
from llama_train.averaging import average_checkpoints
sources = [Path(p) for p in sys.argv[2:4]]
state = average_checkpoints(sources)
with torch.device("meta"):
    model = Llama(config)
model.load_state_dict(state, assign=True)
save_checkpoint(model, sys.argv[4])
print(json.dumps({"peak_MiB": peak_mib()}))
"""

_EXPORT_STREAM = """
from pathlib import Path
from llama_model import save_checkpoint
from llama_train import CheckpointAverage
sources = [Path(p) for p in sys.argv[2:4]]
with torch.device("meta"):
    model = Llama(config)
names = list(model.state_dict())
average = CheckpointAverage(sources, order=names, chunk_bytes=64 * 2**20)
save_checkpoint(model, sys.argv[4], dtype=average.dtype(names[0]), load_weight=average.tensor,
                max_shard_size=256 * 2**20)
print(json.dumps({"peak_MiB": peak_mib()}))
"""


def _child(body: str, *args: str, runs: int = 3) -> float:
    """Median peak resident memory (MiB) of `runs` fresh processes running `body` (the peak moves
    by a few hundred MiB between runs with how the allocator reuses freed blocks)."""
    code = textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(body)
    peaks = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(MODEL), *args], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
        peaks.append(float(json.loads(out.stdout.strip().splitlines()[-1])["peak_MiB"]))
    return statistics.median(peaks)


def _baseline() -> float:
    return _child("print(json.dumps({'peak_MiB': peak_mib()}))\n")


def memory_rows(work: Path) -> list[dict[str, object]]:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from llama_model import Llama

    config = LlamaConfig.model_validate(MODEL)
    fp32_mib = count_parameters(config) * 4 / 2**20
    rows: list[dict[str, object]] = []
    base = _baseline()
    for name, body in (("meta + own shards (now)", _START_META),
                       ("whole model, then shard (before)", _START_FULL)):  # fmt: skip
        peak = _child(body)
        rows.append({"what": "start-up, rank 0 of 8 (FSDP)", "impl": name, "peak_MiB": peak,
                     "above_interpreter_MiB": peak - base, "model_fp32_MiB": fp32_mib})  # fmt: skip
    sources = []
    for seed in (0, 1):
        model = Llama(config)
        model.init_weights(seed=seed)
        path = work / f"step-{seed}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
        sources.append(str(path))
        del model
    for name, body in (("streamed (now)", _EXPORT_STREAM), ("whole model (before)", _EXPORT_WHOLE)):
        peak = _child(body, *sources, str(work / f"export-{name.split()[0]}"))
        rows.append({"what": "export, average of 2 checkpoints", "impl": name, "peak_MiB": peak,
                     "above_interpreter_MiB": peak - base, "model_fp32_MiB": fp32_mib})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "train_scale_cpu.json")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "llama", "token", "shard", "model", "loss"]
        docs = (Document(id=str(i), text=" ".join(rng.choice(words, size=int(rng.integers(20, 600)))))
                for i in range(20_000))  # fmt: skip
        write_token_shards(docs, _Bytes(), work / "shards", add_bos=False, add_eos=False)
        rows = loader_rows(work / "shards", args.repeats)
        rows += memory_rows(work)
    print(f"{'what':34} {'impl':33} {'dp':>3} {'ms':>8} {'reads':>6} {'peak MiB':>9} {'+MiB':>7}")
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        peak = f"{r['peak_MiB']:.0f}" if "peak_MiB" in r else ""
        above = f"{r['above_interpreter_MiB']:.0f}" if "above_interpreter_MiB" in r else ""
        print(f"{r['what']:34} {r['impl']:33} {r.get('dp', ''):>3} {ms:>8} "
              f"{r.get('windows_read_per_step', ''):>6} {peak:>9} {above:>7}")  # fmt: skip
    sizes = {r["model_fp32_MiB"] for r in rows if "model_fp32_MiB" in r}
    print(
        f"model: {sizes.pop():.0f} MiB in float32; +MiB: above an interpreter with torch imported"
    )
    result = {"benchmark": "train_scale_cpu", "date": date.today().isoformat(), "cpu": cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "model": MODEL,
              "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
