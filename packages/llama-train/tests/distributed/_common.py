"""Helpers shared by the torchrun worker scripts in this folder (imported as `_common`).

Every rank builds the same tiny model and batch from fixed seeds, so each rank can compute the
single-process reference (loss and gradients of the full batch) itself and compare its parallel
result against it. Tolerance: float32 throughout; the parallel versions sum the same terms in a
different order (sharded matmuls, reduce-scatters), which moves float32 results by a few ulps,
so losses agree to 1e-6 relative and gradients to atol=1e-6, rtol=1e-4.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.distributed as dist
from oracle import language_model_loss

from llama_model import Llama, LlamaConfig
from llama_train.data import IGNORE_INDEX, Batch

LOSS_TOL = {"atol": 1e-6, "rtol": 1e-6}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}


def init() -> tuple[int, int]:
    """Initialise the gloo process group from torchrun's environment; returns (rank, world)."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    return dist.get_rank(), dist.get_world_size()


def tiny_config(**overrides: object) -> LlamaConfig:
    fields: dict[str, object] = {
        "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
        "multiple_of": 32, "max_seq_len": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    fields.update(overrides)
    return LlamaConfig.model_validate(fields)


def tiny_model(config: LlamaConfig, seed: int = 1) -> Llama:
    model = Llama(config)
    model.init_weights(seed=seed, std=0.1)
    return model


def tiny_batch(config: LlamaConfig, batch: int = 4, seq_len: int = 16, seed: int = 2) -> Batch:
    """A packed batch with 1-3 documents per row and cross-document targets ignored."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g)
    cuts = torch.randint(1, 3, (batch, seq_len + 1), generator=g)  # 1 or 2
    doc_ids = (torch.rand(batch, seq_len + 1, generator=g) < 0.1).long().cumsum(1) * cuts[:, :1]
    targets = tokens[:, 1:].clone()
    targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE_INDEX
    return Batch(tokens=tokens[:, :-1], targets=targets, document_ids=doc_ids[:, :-1].contiguous())


def reference(model: Llama, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of the unparallelised `model` on the whole batch."""
    model.zero_grad(set_to_none=True)
    loss = language_model_loss(model, batch)
    loss.backward()  # type: ignore[no-untyped-call]
    grads = {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor; a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def check_grads(named_grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected gradient is present (gathered to full size) and matches."""
    missing = set(expected) - set(named_grads)
    assert not missing, f"no gradient for {sorted(missing)}"
    for name, grad in named_grads.items():
        torch.testing.assert_close(
            full(grad), expected[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


def done(rank: int, what: str) -> None:
    """Report success and leave at once. The process exits with os._exit: under CPU contention,
    the interpreter's teardown after FSDP2 on gloo sometimes aborts with "terminate called
    without an active exception" (a C++ thread destroyed while joinable) after every check has
    passed; measured on check_context_parallel.py with a busy core, 5 of 10 runs."""
    dist.barrier()
    if rank == 0:
        print(f"OK {what} (world {dist.get_world_size()}, pid {os.getpid()})")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): enough to make real token shards for tests."""

    vocab_size = 256
    name = "bytes"
    # Its identity for the shard manifest: the hash of the sentence that defines it.
    sha256 = hashlib.sha256(b"UTF-8 bytes as token ids, vocabulary 256").hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def write_tiny_shards(path: str, *, documents: int = 60, seed: int = 0) -> None:
    """Token shards of `documents` random-length pseudo-text documents (bytes as tokens)."""
    import random

    from llama_data import Document, write_token_shards

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "llama", "token", "shard", "model", "loss"]
    docs = [
        Document(id=str(i), text=" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))))
        for i in range(documents)
    ]
    write_token_shards(docs, ByteTokenizer(), path, add_bos=False, add_eos=False, overwrite=True)


TINY_MODEL_OVERRIDES = (
    "model.overrides={dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, "
    "multiple_of=32, max_seq_len=64, tie_word_embeddings=false}"
)


def trainer_overrides(shards: str, out_dir: str, steps: int = 3) -> list[str]:
    """TrainConfig overrides of the small runs the trainer tests compare."""
    return [
        TINY_MODEL_OVERRIDES,
        f'data.sources=[{{path="{shards}"}}]',
        "data.batch_size=4",
        "data.seq_len=16",
        f"steps={steps}",
        "optimizer.warmup_steps=1",
        "checkpoint.interval=0",
        f'out_dir="{out_dir}"',
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
