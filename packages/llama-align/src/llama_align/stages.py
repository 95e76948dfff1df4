"""The stages of `llama-align` as functions of their configs, and the round that chains them.

Every stage works in ``.<out>.work/`` beside its output directory (training checkpoints, metrics)
and, when it is complete, writes `stage.json` (its config and results) and publishes the work
directory as `out` in one rename (`llama_model.publish_directory`). A stage whose `out` already
holds `stage.json` is done and is skipped, so a killed round restarts at the unfinished stage; a
training stage killed mid-way resumes from its checkpoint in the work directory, exactly.

Under data parallelism (``accelerate launch`` / ``torchrun``) every rank runs the stage; rank 0
writes and publishes, the others wait for it.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from llama_align.config import (
    AverageConfig,
    DpoConfig,
    RewardConfig,
    RoundConfig,
    SampleConfig,
    SftConfig,
)
from llama_align.data import (
    DataReport,
    PreferenceRow,
    PromptRow,
    SftRow,
    encode_preference,
    encode_ranked,
    encode_sft,
    read_rows,
)
from llama_align.policy import Policy
from llama_align.sft import SftObjective, pack_dialogs
from llama_align.trainer import CHECKPOINT_DIR, AlignTrainer
from llama_model import ChatFormat, Llama, Tokenizer, load_checkpoint, publish_directory

__all__ = [
    "STAGE_FILE",
    "MODEL_DIR",
    "stage_done",
    "run_sft",
    "run_rm",
    "run_dpo",
    "run_sample",
    "run_average",
    "run_round",
]

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"  # written last into a stage's directory: its presence means "done"
MODEL_DIR = "model"  # the stage's model (a Hugging Face directory) inside its output directory


def stage_done(out: str | Path) -> bool:
    """Whether the stage publishing to `out` has completed (its `stage.json` exists)."""
    return (Path(out) / STAGE_FILE).is_file()


class _Stage:
    """The work directory of one stage, and its publication."""

    def __init__(self, name: str, out: Path, config: BaseModel, accelerator: Any) -> None:
        self.name, self.out, self.config = name, Path(out), config
        self.accelerator = accelerator
        self.rank0 = accelerator is None or accelerator.is_main_process
        self.work = self.out.with_name(f".{self.out.name}.work")
        if self.rank0:
            self.work.mkdir(parents=True, exist_ok=True)
        self._wait()

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def publish(self, results: dict[str, Any]) -> Path:
        """Write `stage.json`, drop the training checkpoint, publish `work` as `out`."""
        if self.rank0:
            shutil.rmtree(self.work / CHECKPOINT_DIR, ignore_errors=True)
            record = {
                "stage": self.name,
                "config": self.config.model_dump(mode="json"),
                "results": results,
            }
            (self.work / STAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            publish_directory(self.work, self.out)
        self._wait()
        logger.info("%s: published %s", self.name, self.out)
        return self.out


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _skip(name: str, out: Path) -> bool:
    if stage_done(out):
        logger.info("%s: %s is complete (%s exists); skipped", name, out, STAGE_FILE)
        return True
    return False


def _load_policy(path: Path) -> tuple[Llama, Tokenizer, ChatFormat]:
    model = load_checkpoint(path, dtype=torch.float32)  # trained in float32 (autocast computes)
    if model.config.vocab_size != 128_256:
        raise ValueError(
            f"{path} has a vocabulary of {model.config.vocab_size}; llama-align needs Llama 3's "
            "tokenizer (128,256 tokens)"
        )
    tokenizer = Tokenizer.llama3()
    return model, tokenizer, ChatFormat(tokenizer)


def _rows(paths: Sequence[Path], kind: type[Any], report: DataReport) -> list[Any]:
    rows, _ = read_rows(list(paths), kind, report)
    logger.info("%s: %s", kind.__name__, report.summary())
    return rows


# --------------------------------------------------------------------------------------- SFT


def run_sft(config: SftConfig, *, accelerator: Any | None = None) -> Path:
    """Fine-tune `config.model` on `config.data` (§4.1.3); the model is in ``out/model``."""
    if _skip("sft", config.out):
        return config.out
    accelerator = accelerator or _accelerator()
    stage = _Stage("sft", config.out, config, accelerator)
    model, tokenizer, chat = _load_policy(config.model)
    report = DataReport()
    rows = _rows(config.data, SftRow, report)
    examples = encode_sft(chat, rows, max_tokens=config.max_tokens, report=report)
    if not examples:
        raise ValueError(f"no SFT dialog fits max_tokens={config.max_tokens}:\n{report.summary()}")
    packed = pack_dialogs(examples, seq_len=config.max_tokens)
    trainable = _with_lora(model, config.lora)
    trainer = AlignTrainer(
        Policy(trainable), SftObjective(), packed, config.train, stage.work, accelerator=accelerator
    )
    result = trainer.fit()
    if stage.rank0:
        from llama_model import save_checkpoint

        save_checkpoint(
            _merged(trainable, config.lora), stage.work / MODEL_DIR, tokenizer=tokenizer
        )
    return stage.publish(
        {
            "data": report.as_dict(),
            "dialogs": len(examples),
            "packed_rows": len(packed),
            "steps": result.steps,
            "first_loss": result.losses.get(0),
            "last_loss": result.last_metrics.get("loss"),
            "tokens_per_second": result.tokens_per_second,
        }
    )


def _with_lora(model: Llama, lora: Any) -> torch.nn.Module:
    if lora is None:
        return model
    from llama_align.lora import add_lora

    return add_lora(model, lora)


def _merged(model: torch.nn.Module, lora: Any) -> Llama:
    if lora is None:
        assert isinstance(model, Llama)
        return model
    from llama_align.lora import merge_lora

    return merge_lora(model)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- stubs
# (filled below as the modules land)


def run_rm(config: RewardConfig, *, accelerator: Any | None = None) -> Path:
    """Train the reward model (§4.1.2) on a backbone from `config.model`; it is exported to
    ``out/model`` as a Hugging Face `LlamaForSequenceClassification` directory."""
    from llama_align.reward import RewardModel, RewardObjective, pair_accuracy, save_reward_model

    if _skip("rm", config.out):
        return config.out
    accelerator = accelerator or _accelerator()
    stage = _Stage("rm", config.out, config, accelerator)
    backbone, tokenizer, chat = _load_policy(config.model)
    model = RewardModel.from_backbone(backbone, seed=config.head_seed)
    report = DataReport()
    rows = _rows(config.data, PreferenceRow, report)
    examples = encode_ranked(chat, rows, max_tokens=config.max_tokens, report=report)
    heldout = _heldout(config.heldout, chat, config.max_tokens, encode_ranked)
    before = pair_accuracy(model, heldout) if heldout else None
    objective = RewardObjective(one_row=config.one_row, seed=config.train.seed)
    trainer = AlignTrainer(
        model, objective, examples, config.train, stage.work, accelerator=accelerator
    )
    result = trainer.fit()
    after = pair_accuracy(model, heldout) if heldout else None
    if stage.rank0:
        save_reward_model(model, stage.work / MODEL_DIR, tokenizer=tokenizer)
    return stage.publish(
        {
            "data": report.as_dict(),
            "examples": len(examples),
            "steps": result.steps,
            "first_loss": result.losses.get(0),
            "last_loss": result.last_metrics.get("loss"),
            "train_pair_accuracy": result.last_metrics.get("pair_accuracy"),
            "heldout_examples": len(heldout),
            "heldout_pair_accuracy_before": before,
            "heldout_pair_accuracy": after,
            "tokens_per_second": result.tokens_per_second,
        }
    )


def _heldout(
    paths: Sequence[Path], chat: ChatFormat, max_tokens: int, encode: Callable[..., list[Any]]
) -> list[Any]:
    """Held-out preference examples (empty without files); their drops are logged."""
    if not paths:
        return []
    report = DataReport()
    rows = _rows(paths, PreferenceRow, report)
    return encode(chat, rows, max_tokens=max_tokens, report=report)


def run_dpo(config: DpoConfig, *, accelerator: Any | None = None) -> Path:
    """DPO (§4.1.4) from `config.model`, against the reference `config.reference_model` (default:
    the starting model); the model is in ``out/model``, held-out preference accuracy and implicit
    reward margin before and after in `stage.json`."""
    from llama_align.dpo import (
        DpoObjective,
        preference_accuracy,
        reference_logprobs,
        with_reference,
    )

    if _skip("dpo", config.out):
        return config.out
    accelerator = accelerator or _accelerator()
    stage = _Stage("dpo", config.out, config, accelerator)
    model, tokenizer, chat = _load_policy(config.model)
    report = DataReport()
    rows = _rows(config.data, PreferenceRow, report)
    examples: list[Any] = encode_preference(chat, rows, max_tokens=config.max_tokens, report=report)
    heldout: list[Any] = _heldout(config.heldout, chat, config.max_tokens, encode_preference)
    reference: Any = "adapters-off"
    if config.reference != "adapters-off":  # the reference is copied before adapters are added
        reference_llama = (
            _load_policy(config.reference_model)[0]
            if config.reference_model is not None
            else copy.deepcopy(model)
        )
        reference = Policy(reference_llama.requires_grad_(False))
    trainable = _with_lora(model, config.lora)
    policy = Policy(trainable)
    if config.reference == "precomputed":  # once, then the reference model leaves memory
        logps = partial(reference_logprobs, reference, mask=config.mask)
        with config.train.autocast(accelerator.device):  # as the policy computes: ratio 0 at start
            examples = with_reference(examples, logps(examples), mask=config.mask)
            if heldout:
                heldout = with_reference(heldout, logps(heldout), mask=config.mask)
        reference = "precomputed"
        del logps, reference_llama  # nothing else holds the reference model

    def accuracy(pairs: list[Any]) -> tuple[float, float]:
        with config.train.autocast(accelerator.device):  # as the reference log-probs were
            return preference_accuracy(policy, reference, pairs, beta=config.beta, mask=config.mask)

    before = accuracy(heldout) if heldout else None
    objective = DpoObjective(
        reference, beta=config.beta, nll_weight=config.nll_weight, mask=config.mask
    )
    trainer = AlignTrainer(
        policy, objective, examples, config.train, stage.work, accelerator=accelerator
    )
    result = trainer.fit()
    after = accuracy(heldout) if heldout else None
    if stage.rank0:
        from llama_model import save_checkpoint

        save_checkpoint(
            _merged(trainable, config.lora), stage.work / MODEL_DIR, tokenizer=tokenizer
        )
    last = result.last_metrics
    return stage.publish(
        {
            "data": report.as_dict(),
            "pairs": len(examples),
            "steps": result.steps,
            "first_loss": result.losses.get(0),
            "last_loss": last.get("loss"),
            "train_preference_accuracy": last.get("rewards/accuracies"),
            "train_margin": last.get("rewards/margins"),
            "kl_reference": last.get("kl/reference"),
            "heldout_pairs": len(heldout),
            "heldout_accuracy_before": None if before is None else before[0],
            "heldout_margin_before": None if before is None else before[1],
            "heldout_accuracy": None if after is None else after[0],
            "heldout_margin": None if after is None else after[1],
            "tokens_per_second": result.tokens_per_second,
        }
    )


def run_sample(config: SampleConfig) -> Path:
    """Rejection sampling (§4.1.3): K answers per prompt from `config.model` (llama_serve's
    engine, the prompt's KV cache shared by its K samples), scored by `config.reward_model`; the
    best of each prompt goes to ``out/sft.jsonl`` (and best/worst to ``out/pairs.jsonl`` with
    ``sampling.pairs``), with counts by reason of what was rejected in `stage.json`."""
    from llama_align.data import write_rows
    from llama_align.reward import RewardScorer, load_reward_model
    from llama_align.sampling import rejection_sample
    from llama_serve import Engine

    if _skip("sample", config.out):
        return config.out
    stage = _Stage("sample", config.out, config, None)
    report = DataReport()
    prompts = _rows(config.prompts, PromptRow, report)
    tokenizer = Tokenizer.llama3()
    chat = ChatFormat(tokenizer)
    scorer = RewardScorer(load_reward_model(config.reward_model, dtype=torch.float32), chat)
    if config.backend == "vllm":
        from llama_align.vllm_sampler import VllmSampler

        dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16"}[config.dtype]
        with VllmSampler.from_pretrained(config.model, dtype=dtype, **config.vllm) as sampler:
            result = rejection_sample(
                sampler, scorer, chat, prompts, config.sampling, progress=config.progress
            )
    else:
        engine = Engine.from_pretrained(config.model, dtype=config.dtype, tokenizer=tokenizer)
        result = rejection_sample(
            engine, scorer, chat, prompts, config.sampling, progress=config.progress
        )
    write_rows(stage.work / "sft.jsonl", result.sft)
    if config.sampling.pairs:
        write_rows(stage.work / "pairs.jsonl", result.pairs)
    logger.info("sample: %s", result.report.summary())
    return stage.publish({"data": report.as_dict(), "sampling": result.report.as_dict()})


def run_average(config: AverageConfig) -> Path:
    """The weight-by-weight mean of `config.models` (§4.1.5), float64-accumulated and streamed
    one tensor at a time, in ``out/model``."""
    from llama_align.averaging import average_hf_checkpoints

    if _skip("average", config.out):
        return config.out
    stage = _Stage("average", config.out, config, None)
    average_hf_checkpoints(config.models, stage.work / MODEL_DIR, weights=config.weights)
    return stage.publish({"models": [str(m) for m in config.models], "weights": config.weights})


def run_round(config: RoundConfig) -> Path:
    """One round of §4: reward model -> rejection sampling -> SFT -> DPO (one run per seed) ->
    average, each stage in its own directory under `config.out`, skipped when already complete.

    The reward model's backbone and the sampler are `config.policy`; SFT starts from
    `config.policy` on the best samples plus `config.sft_data`; DPO starts from the SFT model (its
    reference); the average of the DPO runs is the round's model, ``out/average/model``.
    """
    out = config.out
    if _skip("round", out):
        return out
    accelerator = _accelerator()
    results: dict[str, Any] = {}

    rm = run_rm(
        RewardConfig(
            **config.rm.model_dump(), model=config.policy, data=config.preferences,
            heldout=config.heldout, out=out / "rm",
        ),
        accelerator=accelerator,
    )  # fmt: skip
    results["rm"] = _results(rm)
    sample_config = SampleConfig(
        model=config.policy, reward_model=rm / MODEL_DIR, prompts=config.prompts,
        out=out / "sample", sampling=config.sample,
    )  # fmt: skip
    sample = _on_rank0(accelerator, lambda: run_sample(sample_config), sample_config.out)
    results["sample"] = _results(sample)
    sft = run_sft(
        SftConfig(
            **config.sft.model_dump(), model=config.policy,
            data=[sample / "sft.jsonl", *config.sft_data], out=out / "sft",
        ),
        accelerator=accelerator,
    )  # fmt: skip
    results["sft"] = _results(sft)
    dpo_runs = []
    for seed in config.dpo_seeds:
        settings = config.dpo.model_dump()
        settings["train"] = {**settings["train"], "seed": seed}
        dpo = run_dpo(
            DpoConfig(
                **settings, model=sft / MODEL_DIR, data=config.preferences,
                heldout=config.heldout, out=out / f"dpo-{seed}",
            ),
            accelerator=accelerator,
        )  # fmt: skip
        results[f"dpo-{seed}"] = _results(dpo)
        dpo_runs.append(dpo / MODEL_DIR)
    average_config = AverageConfig(models=dpo_runs, out=out / "average")
    _on_rank0(accelerator, lambda: run_average(average_config), average_config.out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": "round", "config": config.model_dump(mode="json"), "results": results}
        from llama_model import atomic_write

        with atomic_write(out / STAGE_FILE) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return out


def _results(out: Path) -> Any:
    return json.loads((out / STAGE_FILE).read_text())["results"]


def _on_rank0(accelerator: Any, run: Callable[[], Path], out: Path) -> Path:
    """Run a stage that does not train (sampling, averaging) on rank 0 only; the others wait."""
    if accelerator.is_main_process:
        run()
    accelerator.wait_for_everyone()
    return out
