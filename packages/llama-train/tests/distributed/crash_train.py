"""Worker: `llama-train` (the CLI's `main`) that SIGKILLs itself at a chosen point.

Usage: crash_train.py [--kill POINT] [--kill-rank R] <TrainConfig overrides ...>
Runs as one process or under torchrun. POINT is one of

- ``step:K``: after the forward/backward of step K, before its update (gradients accumulated);
- ``write:N``: inside the N-th checkpoint save, after DCP wrote the tensor files and before it
  writes ``.metadata`` (the save is half-way: the staged ``.tmp-step-*`` directory is partial);
- ``publish:N``: the N-th save's DCP write is complete but the staged directory was not yet
  renamed into place;
- ``swap:N``: the N-th save re-saves an existing step and has just moved the old directory
  aside (to ``.tmp-old-step-*``), before renaming the new one into place;
- ``export:N``: at the start of the final export (after the last checkpoint was published).

Only rank R (default: every rank) kills itself; torchrun then tears the other ranks down. The
pytest side restarts the run and compares it with an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemWriter

from llama_train import cli
from llama_train.checkpoint import TrainCheckpointer
from llama_train.trainer import Trainer


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, n: int) -> None:
    """Patch the trainer so that this process SIGKILLs itself at `point` number `n`."""
    saves = 0
    if point == "export":
        export = Trainer.export

        def patched_export(self: Trainer) -> Any:
            _die()
            return export(self)

        Trainer.export = patched_export  # type: ignore[method-assign]
        return
    if point == "step":
        forward_backward = Trainer.forward_backward

        def patched_forward_backward(self: Trainer, batch: Any) -> float:
            loss = forward_backward(self, batch)
            if self.step == n:
                _die()
            return loss

        Trainer.forward_backward = patched_forward_backward  # type: ignore[method-assign]
        return
    save = TrainCheckpointer.save

    def counting_save(self: TrainCheckpointer, *args: Any, **kwargs: Any) -> Any:
        nonlocal saves
        saves += 1
        return save(self, *args, **kwargs)

    TrainCheckpointer.save = counting_save  # type: ignore[method-assign]
    if point == "write":
        finish = FileSystemWriter.finish

        def patched_finish(self: FileSystemWriter, *args: Any, **kwargs: Any) -> None:
            if saves == n:
                _die()
            finish(self, *args, **kwargs)

        FileSystemWriter.finish = patched_finish  # type: ignore[method-assign,assignment]
    elif point == "publish":
        publish = TrainCheckpointer._publish

        def patched_publish(self: TrainCheckpointer, *args: Any, **kwargs: Any) -> None:
            if saves == n:
                _die()
            publish(self, *args, **kwargs)

        TrainCheckpointer._publish = patched_publish  # type: ignore[method-assign]
    elif point == "swap":
        replace = os.replace

        def patched_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            replace(src, dst, *args, **kwargs)
            if saves == n and os.path.basename(dst).startswith(".tmp-old-"):
                _die()

        os.replace = patched_replace
    else:
        raise SystemExit(f"unknown kill point {point!r}; see the module docstring")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kill", help="step:K, write:N, publish:N, swap:N or export:N")
    parser.add_argument("--kill-rank", type=int, default=None, help="only this rank dies")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    if args.kill and (args.kill_rank is None or args.kill_rank == rank):
        point, _, n = args.kill.partition(":")
        install(point, int(n))
    return cli.main(args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
