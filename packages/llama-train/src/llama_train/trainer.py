"""`Trainer`: Llama 3 pretraining on one `DeviceMesh`, from one CPU process to a GPU cluster.

One code path for every layout. The model is built on the meta device and parallelised in the
order torchtitan uses: pipeline split → tensor (+ sequence) parallel → activation checkpointing →
`torch.compile` per block → FSDP2 over the ``dp_shard × cp`` ranks (HSDP when
``dp_replicate > 1``); then each rank materialises only its stages and shards, with the values a
single-process run starts from (`llama_model.init_parameters`). Each step:

1. every data-parallel rank takes its rows of the global batch (`BatchLoader`); the attention
   backend is the packed documents' (`llama_model.Documents`), or under context parallelism this
   rank's chunks with the keys and values of the others (`ContextParallelAttention`);
2. the loss is the batch's mean next-token cross-entropy over all non-ignored targets of the
   *global* batch: each rank divides its summed cross-entropy by the global target count, and
   gradients are *summed* over the data- and context-parallel ranks (FSDP's divide factor is 1),
   so the update equals a single process's on the whole batch;
3. gradients are clipped by their global norm, the loss is judged by the spike detector (skip the
   update, or roll back to the last checkpoint after repeated spikes), AdamW steps at the
   scheduled learning rate (warmup + cosine, then linear annealing to 0);
4. metrics go to JSONL/TensorBoard, checkpoints to DCP; at the end the model (Polyak-averaged
   over the annealing checkpoints, §3.4.3) is exported in the Hugging Face layout.

bf16 compute keeps fp32 master weights and fp32 gradient reductions: FSDP's mixed-precision policy
where FSDP is on, `torch.autocast` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from llama_data import TokenizerInfo, TokenShards
from llama_model import AttentionBackend, Documents, Llama, LlamaConfig, Tokenizer, flops_per_token
from llama_model import save_checkpoint as export_checkpoint
from llama_train.averaging import CheckpointAverage
from llama_train.checkpoint import ModelState, OptimizerState, TrainCheckpointer
from llama_train.config import SourceConfig, TrainConfig
from llama_train.data import IGNORE_INDEX, Batch, BatchLoader, DataSource
from llama_train.loss import LinearCrossEntropy, summed_cross_entropy
from llama_train.metrics import MetricsLogger, memory_stats, model_flops_utilization, peak_flops
from llama_train.optimizer import build_optimizer, set_learning_rate
from llama_train.parallel.compose import parallelize
from llama_train.parallel.context_parallel import ContextParallelAttention, shard_batch
from llama_train.parallel.distributed import init_distributed
from llama_train.parallel.grad_norm import clip_grad_norm
from llama_train.parallel.mesh import build_mesh
from llama_train.parallel.pipeline import Pipeline, build_pipeline
from llama_train.schedules import annealed_lr
from llama_train.spikes import SpikeDetector

__all__ = ["TrainResult", "Trainer"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished `Trainer.fit` did (losses of the steps this process ran)."""

    steps: int
    losses: dict[int, float] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    exported: Path | None = None


class Trainer:
    """Runs `config` under the current process group (torchrun) or as one process.

    `fit()` resumes from the newest complete checkpoint in ``<out_dir>/checkpoints`` when
    `config.checkpoint.resume` is set, trains to `config.steps`, saves, averages and exports.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device, self._owns_group = init_distributed(config.device)
        try:
            self._setup(config)
        except BaseException:
            self.close()  # a configuration error must not leave the process group behind
            raise

    def _setup(self, config: TrainConfig) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dims = config.parallel.dims().resolve(self.world_size)
        self.mesh = build_mesh(self.dims, self.world_size, self.device.type)
        self.model_config: LlamaConfig = config.model.llama_config()
        self.out_dir = Path(config.out_dir)
        if config.model.attention_kernel == "flex" and (
            self.device.type != "cuda" or self.dims.cp > 1
        ):
            where = "on CPU" if self.device.type != "cuda" else "under context parallelism"
            raise ValueError(
                f"model.attention_kernel = 'flex' cannot train {where}: FlexAttention has no "
                "backward on CPU, and context parallelism attends with a dense mask over the "
                "gathered keys; use 'auto' (flex where it works) or 'dense'"
            )

        sources = self._sources(config.data.sources, "data.sources")  # fail before building
        anneal_sources = (
            self._sources(config.anneal.sources, "anneal.sources")
            if config.anneal.steps and config.anneal.sources
            else []
        )
        self.tokenizer_info = _one_tokenizer([*sources, *anneal_sources])
        # Built without memory; each rank materialises and initialises only its parts and shards.
        with torch.device("meta"):
            model = Llama(self.model_config)
        self.parts, self.pipeline = parallelize(model, self.mesh, self.dims, config, self.device)
        self._pipeline_shape: tuple[int, ...] | None = None
        self._rollbacks_since_accepted = 0
        self.optimizers: list[torch.optim.Optimizer] = [
            build_optimizer(part, config.optimizer, self.device) for part in self.parts
        ]
        self._fsdp = self.dims.dp_replicate * self.dims.dp_shard * self.dims.cp > 1
        # On a CPU, one model part whose output projection is a plain weight (no FSDP, TP or
        # pipeline): the loss takes the final hidden states and never materialises the [B, T,
        # vocab] logits, keeping its chunk buffers between steps (`LinearCrossEntropy`; 2x the
        # plain loss on the debug model, benchmarks/loss_cpu.py). Elsewhere the model projects
        # (sharded projections, stages; on CUDA the compiled loss below is what was measured).
        self._fused_loss = (
            self.device.type == "cpu" and not self._fsdp and self.dims.tp == 1 and self.dims.pp == 1
        )
        self._linear_cross_entropy = LinearCrossEntropy()
        # The float32 upcast of the [B, T, vocab] logits and the cross-entropy, fused by inductor
        # when compiling (the largest activation of a small model: +2-3% MFU on an H100).
        self._cross_entropy = (
            torch.compile(summed_cross_entropy) if config.compile else summed_cross_entropy
        )

        dp_rank = self.mesh["dp"].get_local_rank()
        ramp = config.data.batch_ramp()
        self.loader = BatchLoader(
            sources, ramp, seed=config.data.seed, dp_rank=dp_rank, dp_size=self.dims.dp
        )
        self.anneal_loader: BatchLoader | None = None
        if config.anneal.steps and config.anneal.sources:
            self.anneal_loader = BatchLoader(
                anneal_sources,
                ramp,
                seed=config.data.seed + 1,
                dp_rank=dp_rank,
                dp_size=self.dims.dp,
            )
        self.spikes = SpikeDetector(
            window=config.spikes.window,
            min_history=config.spikes.min_history,
            zscore=config.spikes.zscore,
            min_ratio=config.spikes.min_ratio,
            max_consecutive=config.spikes.max_consecutive,
        )
        if not config.checkpoint.resume:
            self._set_aside_earlier_checkpoints()
        self.checkpointer = TrainCheckpointer(
            self.out_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            async_save=config.checkpoint.async_save,
        )
        self.step = 0
        self.lr_schedule = config.lr_schedule()
        self.anneal_start = config.steps - config.anneal.steps

    # ------------------------------------------------------------------------------- setup
    def _set_aside_earlier_checkpoints(self) -> None:
        """A fresh run (resume off) in an out_dir holding an earlier run's checkpoints: move them,
        with its metrics, to ``checkpoints.previous-N`` (never deleted, never mixed with ours)."""
        root = self.out_dir / "checkpoints"
        if self.rank == 0 and root.is_dir() and any(root.iterdir()):
            index = 1
            while root.with_name(f"checkpoints.previous-{index}").exists():
                index += 1
            aside = root.with_name(f"checkpoints.previous-{index}")
            os.replace(root, aside)
            for name in ("metrics.jsonl", "events.jsonl", "loss.png", "tensorboard"):
                if (self.out_dir / name).exists():  # the earlier run's record goes with them
                    os.replace(self.out_dir / name, aside / name)
            log.warning(
                "checkpoint.resume is off: moved the earlier run's checkpoints to %s", aside
            )
        dist.barrier()

    def _sources(self, configs: tuple[SourceConfig, ...], where: str) -> list[DataSource]:
        if not configs:
            raise ValueError(
                f"{where} is empty: give at least one token-shard directory, e.g. "
                f'{where} = [{{path = "shards"}}] (write shards with llama-data)'
            )
        sources = []
        for source in configs:
            shards = TokenShards(source.path)
            vocab = shards.manifest.tokenizer.vocab_size
            if vocab > self.model_config.vocab_size:
                raise ValueError(
                    f"token shards {source.path} use a vocabulary of {vocab} ids, larger than the "
                    f"model's vocab_size {self.model_config.vocab_size}"
                )
            sources.append(DataSource(name=source.label, shards=shards, weight=source.weight))
        return sources

    def _state(self) -> dict[str, Any]:
        return {
            "model": ModelState(self.parts),
            "optim": OptimizerState(self.parts, self.optimizers),
        }

    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": self.loader.state_dict(),
            "anneal_data": None if self.anneal_loader is None else self.anneal_loader.state_dict(),
            "spikes": self.spikes.state_dict(),
            "model": self.model_config.model_dump(mode="json"),
        }

    def resume(self) -> int:
        """Load the newest complete checkpoint if resuming is on; returns the step to start at."""
        latest = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return 0
        state = self.checkpointer.load(latest, self._state())
        saved = state.get("model")  # recorded since the attention seam; older checkpoints lack it
        current = self.model_config.model_dump(mode="json")
        if saved is not None and saved != current:
            changed = sorted(
                k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
            )
            raise ValueError(
                f"the checkpoint {latest} was trained as another model (its config differs in "
                f"{', '.join(changed)}); resume with the same model (preset and overrides), or "
                "start a new run in another out_dir"
            )
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        if self.anneal_loader is not None and state.get("anneal_data") is not None:
            self.anneal_loader.load_state_dict(state["anneal_data"])
        self.spikes.load_state_dict(state["spikes"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", latest, self.step)
        return self.step

    # ------------------------------------------------------------------------------- a step
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step`: warmup + cosine, then linear annealing to 0."""
        if self.config.anneal.steps:
            return annealed_lr(self.lr_schedule, step, self.anneal_start, self.config.steps)
        return self.lr_schedule.lr(step)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.dtype == "bfloat16" and not self._fsdp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: Batch) -> float:
        """Accumulate this rank's gradients for `batch`; returns the global batch's mean loss."""
        tokens, targets, document_ids = (
            t.to(self.device, non_blocking=True)
            for t in (batch.tokens, batch.targets, batch.document_ids)
        )
        count = (targets != IGNORE_INDEX).sum().to(torch.float32)
        if self.dims.dp > 1:
            dist.all_reduce(count, group=self.mesh["dp"].get_group())
        count = count.clamp(min=1.0)
        attention: AttentionBackend
        if self.dims.cp > 1:  # this rank's chunks; keys and values gathered from the others
            shard = shard_batch(
                Batch(tokens, targets, document_ids), self.dims.cp, self.mesh["cp"].get_local_rank()
            )
            tokens, targets = shard.tokens, shard.targets
            attention = ContextParallelAttention(
                self.mesh["cp"], shard.positions, shard.attention_mask
            )
        else:  # packed documents (§3.2), positions restarting per document
            attention = Documents(document_ids, kernel=self.config.model.attention_kernel)
        if self.pipeline is not None:  # the schedule runs forward and backward per micro-batch
            pipeline = self._pipeline_for(tuple(tokens.shape))
            with self._autocast():
                loss = pipeline.step(
                    tokens, targets, attention=attention, num_targets=count, broadcast_loss=True
                )
            assert loss is not None  # broadcast to every pipeline rank
        else:
            model = self.parts[0]
            with self._autocast():
                if self._fused_loss:
                    assert isinstance(model, Llama)
                    hidden = model.hidden_states(tokens, attention=attention)  # [B, T, dim]
                    summed = self._linear_cross_entropy(hidden, model.output_weight(), targets)
                else:
                    summed = self._cross_entropy(model(tokens, attention=attention), targets)
            loss = summed / count
            loss.backward()  # type: ignore[no-untyped-call]
        loss = loss.detach().float()
        if self.dims.dp * self.dims.cp > 1:  # every rank's share of the global mean: sum them
            dist.all_reduce(loss, group=self.mesh["dp_cp"].get_group())
        return float(loss)

    def _pipeline_for(self, shape: tuple[int, ...]) -> Pipeline:
        """The pipeline schedule for batches of `shape`: rebuilt when a ramp stage changes the rows
        or the length (PyTorch fixes a schedule's micro-batch shapes at its first step)."""
        assert self.pipeline is not None
        if self._pipeline_shape not in (None, shape):
            self.pipeline = build_pipeline(
                self.parts,
                schedule=self.config.parallel.pp_schedule,
                n_microbatches=self.config.parallel.pp_microbatches,
                device=self.device,
                group=self.mesh["pp"].get_group(),
            )
        self._pipeline_shape = shape
        return self.pipeline

    def clip_gradients(self) -> float:
        """Clip all gradients by their global L2 norm (over every shard and stage); returns it."""
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        return clip_grad_norm(self.parts, self.config.optimizer.max_grad_norm, pp_group=pp_group)

    # ------------------------------------------------------------------------------- the run
    def _batches(self) -> Iterator[Batch]:
        while True:
            loader = self.loader
            if self.anneal_loader is not None and self.step >= self.anneal_start:
                if self.anneal_loader.step == 0:  # the switch: the ramp goes on where it was
                    self.anneal_loader.tokens_seen = self.loader.tokens_seen
                loader = self.anneal_loader
            batch = loader.next_batch()
            # A new mix (annealing) or sequence length moves the loss level on purpose: the
            # spike statistic starts again rather than rejecting the new level as spikes. (The
            # regime is part of the detector's checkpointed state, so a resumed run agrees.)
            regime = (
                f"{'anneal' if loader is self.anneal_loader else 'main'}/{batch.tokens.shape[1]}"
            )
            if self.spikes.regime not in (None, regime):
                self.spikes.reset()
            self.spikes.regime = regime
            yield batch

    def _rollback(self, metrics: MetricsLogger) -> None:
        self.checkpointer.wait()  # an async save in flight is the newest checkpoint
        latest = self.checkpointer.latest()
        if latest is None:
            raise FloatingPointError(
                f"{self.config.spikes.max_consecutive} loss spikes in a row at step {self.step} "
                "and no checkpoint to roll back to; lower optimizer.peak_lr or save checkpoints "
                "more often (checkpoint.interval)"
            )
        if self._rollbacks_since_accepted >= 1:
            raise FloatingPointError(
                f"the loss stayed above the spike threshold after rolling back to {latest.name} "
                f"(step {self.step}); the loss level itself changed: check the data and the "
                "learning rate, or raise spikes.zscore / spikes.min_ratio"
            )
        self._rollbacks_since_accepted += 1
        self.checkpointer.load(latest, self._state())  # weights and optimizer; data moves on
        metrics.event(
            self.step, "rollback", f"rolled back weights to {latest.name}", checkpoint=str(latest)
        )

    def save(self, *, keep: bool = False) -> Path:
        return self.checkpointer.save(self.step, self._state(), self._train_state(), keep=keep)

    def _save_logged(self, metrics: MetricsLogger, *, keep: bool = False) -> None:
        path = self.save(keep=keep)
        what = "annealing snapshot" if keep else "checkpoint"
        metrics.event(self.step, "checkpoint_saved", f"{what} {path}", path=str(path))

    def fit(self) -> TrainResult:
        """Train from the resumed step to `config.steps`; save, average, export."""
        config = self.config
        start = self.resume()
        result = TrainResult(steps=config.steps)
        metrics = MetricsLogger(
            self.out_dir,
            tensorboard=config.logging.tensorboard,
            enabled=self.rank == 0,
            resume_step=start,
        )
        peak = (
            config.logging.peak_tflops * 1e12
            if config.logging.peak_tflops
            else peak_flops(
                self.device, torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
            )
        )
        bar = tqdm(
            total=config.steps,
            initial=start,
            unit="step",
            disable=self.rank != 0 or not config.logging.progress,
        )
        saved_at = -1
        batches = self._batches()
        with bar, metrics:
            while self.step < config.steps:
                step = self.step
                batch = next(batches)
                lr = self.lr_at(step)
                set_learning_rate(self.optimizers, lr)
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                started = time.perf_counter()
                loss = self.forward_backward(batch)
                grad_norm = self.clip_gradients()
                # A non-finite gradient norm (finite loss, overflowing backward) must not reach
                # the weights either: it counts as a non-finite loss.
                judged = loss if math.isfinite(grad_norm) else math.nan
                verdict = self.spikes.judge(judged) if config.spikes.enabled else "ok"
                if verdict == "ok" and not math.isfinite(judged):
                    raise FloatingPointError(
                        f"loss {loss}, gradient norm {grad_norm} at step {step}; enable spikes "
                        "to skip such steps"
                    )
                if verdict == "ok":
                    for optimizer in self.optimizers:
                        optimizer.step()
                    self._rollbacks_since_accepted = 0
                else:
                    result.skipped.append(step)
                    metrics.event(
                        step, "spike_skipped", f"loss {loss:.4f} skipped (threshold "
                        f"{self.spikes.threshold()})", loss=loss, grad_norm=grad_norm,
                    )  # fmt: skip
                    if verdict == "rollback":
                        self._rollback(metrics)
                        result.rollbacks.append(step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - started
                seq_len = batch.tokens.shape[1]
                global_tokens = batch.tokens.numel() * self.dims.dp
                tokens_per_s = global_tokens / elapsed
                values = {
                    "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                    "seq_len": float(seq_len), "batch_tokens": float(global_tokens),
                    "skipped": float(verdict != "ok"),
                }  # fmt: skip
                if peak is not None:
                    values["mfu"] = model_flops_utilization(
                        tokens_per_s / self.world_size,
                        flops_per_token(self.model_config, seq_len),
                        peak,
                    )
                if step % config.logging.log_interval == 0 or step == config.steps - 1:
                    values.update(memory_stats(self.device))
                    metrics.log(step, values)
                result.losses[step] = loss
                self.step = step + 1
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                bar.update()
                # The annealing snapshot first: a kill between the two saves then resumes after
                # a step whose snapshot exists.
                if (
                    config.anneal.steps
                    and self.step > self.anneal_start
                    and (
                        (self.step - self.anneal_start) % config.anneal.checkpoint_interval == 0
                        or self.step == config.steps
                    )
                ):
                    self._save_logged(metrics, keep=True)
                interval = config.checkpoint.interval
                # No save in the middle of a spike streak: a rollback must find weights from
                # before it.
                if (
                    interval
                    and self.step % interval == 0
                    and self.step < config.steps
                    and self.spikes.consecutive == 0
                ):
                    self._save_logged(metrics)
                    saved_at = self.step
            if saved_at != self.step:
                self._save_logged(metrics)
            self.checkpointer.wait()
        if config.export:
            result.exported = self.export()
        return result

    def export(self) -> Path | None:
        """Write the final model (the Polyak average of the annealing checkpoints, if any, else
        the last checkpoint) to ``<out_dir>/model`` in the Hugging Face layout (rank 0)."""
        path = self.out_dir / "model"
        if self.rank == 0:
            keep = self.out_dir / "checkpoints" / "keep"
            snapshots = sorted(keep.glob("step-*")) if keep.is_dir() else []
            latest = self.checkpointer.latest()
            sources = snapshots or ([latest] if latest is not None else [])
            if not sources:
                raise RuntimeError("nothing to export: no checkpoint was written")
            with torch.device("meta"):
                model = Llama(self.model_config)
            # One group of averaged tensors in memory at a time, never the whole model.
            names = list(model.state_dict())
            average = CheckpointAverage(sources, order=names)
            export_checkpoint(
                model,
                path,
                tokenizer=self._tokenizer(),
                dtype=average.dtype(names[0]),
                load_weight=average.tensor,
            )
            log.info(
                "exported %s (average of %d checkpoints) to %s",
                sources[-1].name,
                len(sources),
                path,
            )
        dist.barrier()
        return path

    def _tokenizer(self) -> Tokenizer | None:
        """The Llama 3 tokenizer, exported with the model, when the shards were written with it
        (the manifests' sha256); otherwise the export holds no tokenizer, and says so."""
        llama3 = Tokenizer.llama3()
        if self.tokenizer_info.sha256 == llama3.sha256:
            return llama3
        log.warning(
            "exporting without tokenizer files: the shards were tokenized by %r (sha256 %s), not "
            "the Llama 3 tokenizer; add that tokenizer's files to the export to use it",
            self.tokenizer_info.name,
            self.tokenizer_info.sha256,
        )
        return None

    def close(self) -> None:
        """Release the process group if this trainer created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _one_tokenizer(sources: list[DataSource]) -> TokenizerInfo:
    """The tokenizer every source was written with (their manifests' identity); an error naming
    both when two differ, or when a mix contains an old manifest that cannot tell."""
    first = sources[0]
    info = first.shards.tokenizer
    for source in sources[1:]:
        other = source.shards.tokenizer
        if not (info.known and other.known):
            unknown = source if info.known else first
            raise ValueError(
                f"data source {unknown.name!r} does not record its tokenizer (an old manifest), "
                "so the run cannot check that its sources share one; rewrite it with "
                "llama-data's write_token_shards, which records the tokenizer"
            )
        if (other.sha256, other.vocab_size) != (info.sha256, info.vocab_size):
            raise ValueError(
                f"data sources {first.name!r} and {source.name!r} were tokenized differently: "
                f"{first.name!r} by {info.name!r} (sha256 {info.sha256[:16]}..., vocabulary "
                f"{info.vocab_size}), {source.name!r} by {other.name!r} (sha256 "
                f"{other.sha256[:16]}..., vocabulary {other.vocab_size}); token ids mean "
                "different things in them: re-tokenize one with the other's tokenizer"
            )
    return info
