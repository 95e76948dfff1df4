"""Worker: run the `Trainer` under several parallel layouts in one torchrun launch.

Usage: check_trainer.py <shards> <out_root> <name>:<override>;<override> ...
Each layout trains the tiny model for a few steps from the same seed and data; rank 0 writes
``<out_root>/<name>/losses.json``. The pytest side compares losses and the exported weights with a
single-process run of the same config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _common
import torch.distributed as dist

from llama_train.config import TrainConfig
from llama_train.trainer import Trainer

shards, out_root, *layouts = sys.argv[1:]
rank, world = _common.init()
for layout in layouts:
    name, _, spec = layout.partition(":")
    overrides = [o for o in spec.split(";") if o]
    config = TrainConfig.load(
        None, [*_common.trainer_overrides(shards, f"{out_root}/{name}"), *overrides]
    )
    trainer = Trainer(config)
    result = trainer.fit()
    trainer.close()
    if rank == 0:
        Path(out_root, name, "losses.json").write_text(json.dumps(result.losses))
    dist.barrier()
names = [layout.partition(":")[0] for layout in layouts]
_common.done(rank, f"trainer layouts {names}")
