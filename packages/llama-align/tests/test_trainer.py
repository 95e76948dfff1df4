"""The post-training loop with the SFT objective: the learned tokens, packing, split invariance,
exact resume from its checkpoint, metrics files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align_fixtures import sft_rows
from llama_align.data import SftRow, encode_sft
from llama_align.policy import Policy
from llama_align.sft import SftObjective, pack_dialogs
from llama_align.trainer import CHECKPOINT_DIR, AlignTrainer, TrainSettings
from llama_model import ChatFormat, Documents, Llama, LlamaConfig, Message, Tokenizer

CONFIG = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=256, rope_scaling=None
)


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.llama3())


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(CONFIG)
    model.init_weights(seed=seed)
    return model


def _rows(n: int) -> list[SftRow]:
    return [
        SftRow(
            messages=[
                Message(role="user", content=f"What is {i} plus {i}?"),
                Message(role="assistant", content=f"It is {2 * i}." + " Indeed." * (i % 4)),
            ]
        )
        for i in range(n)
    ]


def test_sft_loss_is_the_mean_nll_of_assistant_tokens(chat: ChatFormat) -> None:
    """The SFT loss equals cross-entropy over exactly the assistant tokens of each dialog, each
    dialog computed alone (the packed row's document mask), float32."""
    examples = encode_sft(chat, _rows(3), max_tokens=256)
    rows = pack_dialogs(examples, seq_len=256)
    assert len(rows) == 1  # three dialogs share one row
    model = _model()
    objective = SftObjective()
    batch = objective.collate(rows)
    sums, _ = objective.loss_sums(Policy(model), batch)
    loss = sums["tokens"] / objective.denominators(batch)["tokens"]

    total, count = 0.0, 0
    for example in examples:  # oracle: each dialog alone, plain causal attention, no grad
        tokens = torch.tensor([example.dialog.tokens])
        with torch.no_grad():
            logits = model(tokens)[0, :-1].double()
        learn = torch.tensor(example.dialog.assistant_mask[1:])
        nll = F.cross_entropy(logits, tokens[0, 1:], reduction="none")
        total += float(nll[learn].sum())
        count += int(learn.sum())
    torch.testing.assert_close(float(loss.detach()), total / count, rtol=1e-5, atol=1e-6)
    assert int(batch["mask"].sum()) == count


def test_documents_are_packed_in_order_without_splitting(chat: ChatFormat) -> None:
    """Packing keeps dialogs whole and in order and numbers them per row."""
    examples = encode_sft(chat, sft_rows(5), max_tokens=64)  # dialogs of one length
    length = len(examples[0].dialog)
    assert {len(e.dialog) for e in examples} == {length}
    rows = pack_dialogs(examples, seq_len=2 * length + 1)
    assert [len(r.tokens) for r in rows] == [2 * length, 2 * length, length]
    assert rows[0].document_ids == (0,) * length + (1,) * length
    flat = [t for r in rows for t in r.tokens]
    assert flat == [t for e in examples for t in e.dialog.tokens]


def _train(tmp: Path, chat: ChatFormat, **settings: object) -> list[float]:
    rows = pack_dialogs(encode_sft(chat, _rows(8), max_tokens=64), seq_len=64)
    defaults: dict[str, object] = dict(
        steps=4,
        batch_size=4,
        micro_batch_size=4,
        lr=1e-3,
        dtype="float32",
        progress=False,
        tensorboard=False,
    )
    defaults.update(settings)
    trainer = AlignTrainer(
        Policy(_model()),
        SftObjective(),
        rows,
        TrainSettings(**defaults),
        tmp,  # type: ignore[arg-type]
    )
    result = trainer.fit()
    return [result.losses[s] for s in sorted(result.losses)]


def test_micro_batches_do_not_change_the_step(tmp_path: Path, chat: ChatFormat) -> None:
    """One micro-batch of 4 rows or four of 1 give the same losses (the global denominators).

    rtol 1e-4: the first loss is equal to float32 rounding; later ones carry a few ulps of
    gradient summation order through Adam (lr 1e-3). Dividing by each micro-batch's own token
    count instead moves the first loss by 1e-3 on these rows (measured)."""
    whole = _train(tmp_path / "a", chat, micro_batch_size=4)
    split = _train(tmp_path / "b", chat, micro_batch_size=1)
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    assert whole[-1] < whole[0]  # and it learns


def test_resume_continues_bit_for_bit(tmp_path: Path, chat: ChatFormat) -> None:
    """A run stopped at step 2 (its checkpoint) and resumed gives the uninterrupted losses."""
    straight = _train(tmp_path / "straight", chat, steps=4)
    first = _train(tmp_path / "resumed", chat, steps=2, checkpoint_every=2)
    state = json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 2
    rest = _train(tmp_path / "resumed", chat, steps=4, checkpoint_every=2)
    assert first + rest == straight
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_bad_settings_name_the_field() -> None:
    """A micro-batch larger than the batch is refused with both values named."""
    with pytest.raises(ValueError, match=r"micro_batch_size \(8\) exceeds batch_size \(4\)"):
        TrainSettings(batch_size=4, micro_batch_size=8)


def test_optimizer_is_the_settings_fused_adamw() -> None:
    """`TrainSettings.optimizer` (what `AlignTrainer` steps, and what the benchmark's hand loop
    builds) carries the settings' lr, betas and weight decay, with the fused kernel on CPU."""
    settings = TrainSettings(lr=3e-4, betas=(0.8, 0.9), weight_decay=0.1)
    optimizer = settings.optimizer([torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.9), 0.1)
    assert group["fused"] is True


def test_documents_backend_matches_in_collate(chat: ChatFormat) -> None:
    """Padding is a document of its own: the padded row's learned log-probs equal the unpadded."""
    rows = pack_dialogs(encode_sft(chat, _rows(3), max_tokens=64), seq_len=40)
    objective = SftObjective()
    model = Policy(_model())
    both = objective.collate(rows[:2])
    alone = objective.collate(rows[1:2])
    with torch.no_grad():
        a = model(
            both["tokens"], both["targets"], both["mask"], attention=Documents(both["document_ids"])
        )
        b = model(
            alone["tokens"],
            alone["targets"],
            alone["mask"],
            attention=Documents(alone["document_ids"]),
        )
    n = int(both["mask"][0].sum())
    torch.testing.assert_close(a[n:], b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_trains_and_draws_the_curves(tmp_path: Path, chat: ChatFormat) -> None:
    """dtype="bfloat16" computes under autocast: the loss falls, and metrics.jsonl (with the
    objective's metrics), loss.png and curves.png are written."""
    losses = _train(tmp_path, chat, dtype="bfloat16", steps=4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert (tmp_path / "metrics.jsonl").is_file()
    for png in ("loss.png", "curves.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "loss_tokens", "nll", "lr", "grad_norm", "tokens_per_s"} <= record.keys()
