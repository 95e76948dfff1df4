"""Run a few SFT steps with AlignTrainer on this process group (or alone) and write the losses.

torchrun --nproc-per-node 2 dp_sft.py OUT_DIR     (or python dp_sft.py OUT_DIR)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llama_align.data import SftRow, encode_sft
from llama_align.policy import Policy
from llama_align.sft import SftObjective, pack_dialogs
from llama_align.trainer import AlignTrainer, TrainSettings
from llama_model import ChatFormat, Llama, LlamaConfig, Message, Tokenizer

CONFIG = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=256, rope_scaling=None
)


def main(out: Path) -> None:
    chat = ChatFormat(Tokenizer.llama3())
    rows = [
        SftRow(
            messages=[
                Message(role="user", content=f"Spell {i} twice, {'please ' * (i % 3)}"),
                Message(role="assistant", content=f"{i} {i}" + " again" * (i % 4)),
            ]
        )
        for i in range(12)
    ]
    packed = pack_dialogs(encode_sft(chat, rows, max_tokens=48), seq_len=48)
    model = Llama(CONFIG)
    model.init_weights(seed=0)
    settings = TrainSettings(
        steps=3,
        batch_size=4,
        micro_batch_size=1,
        lr=1e-3,
        dtype="float32",
        progress=False,
        tensorboard=False,
    )
    trainer = AlignTrainer(Policy(model), SftObjective(), packed, settings, out / "run")
    result = trainer.fit()
    if trainer.rank == 0:
        weights = {k: v.double().sum().item() for k, v in model.state_dict().items()}
        payload = {"world": trainer.world, "losses": result.losses, "weights": weights}
        (out / f"result-{trainer.world}.json").write_text(json.dumps(payload))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
