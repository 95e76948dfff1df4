"""Packed training batches and the single-process loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_data import Document, TokenShards, write_token_shards
from llama_model import Llama, LlamaConfig
from llama_train.data import IGNORE_INDEX, packed_batches
from llama_train.loop import train
from llama_train.schedules import LrSchedule


class CharTokenizer:
    """One id per character code (small vocabulary), BOS 1 and EOS 2 added by the shard writer."""

    vocab_size, bos_id, eos_id = 128, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 120) for c in text]


def make_shards(tmp_path: Path, texts: list[str]) -> TokenShards:
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    write_token_shards(docs, CharTokenizer(), tmp_path / "shards")
    return TokenShards(tmp_path / "shards")


def test_batches_shift_targets_and_ignore_cross_document_steps(tmp_path: Path) -> None:
    """Targets are the inputs shifted by one; the step into a new document is ignored; the
    document ids come from the shards."""
    shards = make_shards(tmp_path, ["abcdef", "ghij", "klmnopq", "rs"])
    batch = next(packed_batches(shards, batch_size=2, seq_len=5, seed=0))
    assert batch.tokens.shape == batch.targets.shape == batch.document_ids.shape == (2, 5)
    windows = list(shards.sample_sequences(6, seed=0))[:2]
    for row, (tokens, ids) in enumerate(windows):
        assert batch.tokens[row].tolist() == tokens[:-1].tolist()
        for t in range(5):
            expected = tokens[t + 1] if ids[t + 1] == ids[t] else IGNORE_INDEX
            assert batch.targets[row, t].item() == expected


def test_batches_resume_exactly(tmp_path: Path) -> None:
    """start_step=k yields the k-th and later batches of a fresh pass."""
    shards = make_shards(tmp_path, [chr(97 + i % 26) * (5 + i) for i in range(20)])
    full = list(packed_batches(shards, batch_size=2, seq_len=8, seed=1))
    resumed = list(packed_batches(shards, batch_size=2, seq_len=8, seed=1, start_step=3))
    assert len(full) > 4
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    with pytest.raises(ValueError, match="start_step"):
        next(packed_batches(shards, batch_size=2, seq_len=8, seed=1, start_step=-1))


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    """A tiny model trained on repetitive text lowers its loss well below the starting value."""
    shards = make_shards(tmp_path, ["the cat sat on the mat. " * 40] * 12)
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                         multiple_of=32, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    model = Llama(config)
    model.init_weights(seed=0)
    schedule = LrSchedule(peak_lr=3e-3, warmup_steps=5, total_steps=61, final_lr=3e-4)
    batches = packed_batches(shards, batch_size=4, seq_len=32, seed=0)
    history = train(model, batches, schedule=schedule, steps=60, progress=False)
    assert len(history) == 60
    assert history[0].loss > 4.0  # about log(128) at random init
    assert sum(m.loss for m in history[-5:]) / 5 < 0.5 * history[0].loss
    assert history[0].lr == 0.0 and history[5].lr == pytest.approx(3e-3)
    with pytest.raises(ValueError, match="steps"):
        train(model, batches, schedule=schedule, steps=0)
