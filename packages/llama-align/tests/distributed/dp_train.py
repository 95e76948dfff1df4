"""Run a few steps of one objective (sft, rm or dpo) with AlignTrainer on this process group (or
alone) and write the losses and weight sums.

torchrun --nproc-per-node 2 dp_train.py OBJECTIVE OUT_DIR    (or python dp_train.py OBJECTIVE OUT_DIR)
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from llama_align.data import (
    PreferenceRow,
    SftRow,
    encode_preference,
    encode_ranked,
    encode_sft,
)
from llama_align.dpo import DpoObjective, reference_logprobs, with_reference
from llama_align.policy import Policy
from llama_align.reward import RewardModel, RewardObjective
from llama_align.sft import SftObjective, pack_dialogs
from llama_align.trainer import AlignTrainer, TrainSettings
from llama_model import ChatFormat, Llama, Message, Tokenizer

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' helpers, as conftest does
from align_fixtures import tiny_llama


def _question(i: int) -> Message:
    return Message(role="user", content=f"Spell {i} twice, {'please ' * (i % 3)}")


def _answer(i: int) -> Message:  # of varied lengths, so rows pack unevenly
    return Message(role="assistant", content=f"{i} {i}" + " again" * (i % 4))


def _task(kind: str, chat: ChatFormat, model: Llama) -> tuple[torch.nn.Module, Any, list[Any]]:
    """(the module trained, its objective, its examples) for `kind`."""
    if kind == "sft":
        rows = [SftRow(messages=[_question(i), _answer(i)]) for i in range(12)]
        packed = pack_dialogs(encode_sft(chat, rows, max_tokens=48), seq_len=48)
        return Policy(model), SftObjective(), packed
    preferences = [
        PreferenceRow(
            prompt=[_question(i)],
            chosen=[_answer(i)],
            rejected=[Message(role="assistant", content=f"{i + 1}" + " no" * (i % 3))],
        )
        for i in range(12)
    ]
    if kind == "rm":
        examples = encode_ranked(chat, preferences, max_tokens=64)
        return RewardModel.from_backbone(model, seed=0), RewardObjective(seed=0), examples
    if kind == "dpo":  # the stage's default: reference log-probs precomputed by every rank
        pairs = encode_preference(chat, preferences, max_tokens=64)
        reference = Policy(copy.deepcopy(model).requires_grad_(False))
        pairs_with_reference = with_reference(pairs, reference_logprobs(reference, pairs))
        return Policy(model), DpoObjective("precomputed"), pairs_with_reference
    raise ValueError(f"unknown objective {kind!r}; use sft, rm or dpo")


def main(kind: str, out: Path) -> None:
    # A stuck rank prints every thread's stack and exits, so the test sees where (HANG_S: set by
    # the test; none when run by hand).
    if "HANG_S" in os.environ:
        faulthandler.dump_traceback_later(float(os.environ["HANG_S"]), exit=True)
    chat = ChatFormat(Tokenizer.llama3())
    model = tiny_llama(seed=0)
    trained, objective, examples = _task(kind, chat, model)
    settings = TrainSettings(
        steps=3,
        batch_size=4,
        micro_batch_size=1,
        lr=1e-3,
        dtype="float32",
        progress=False,
        tensorboard=False,
    )
    trainer = AlignTrainer(trained, objective, examples, settings, out / "run")
    result = trainer.fit()
    if trainer.rank == 0:
        weights = {k: v.double().sum().item() for k, v in trained.state_dict().items()}
        payload = {"world": trainer.world, "losses": result.losses, "weights": weights}
        (out / f"result-{trainer.world}.json").write_text(json.dumps(payload))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
