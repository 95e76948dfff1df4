"""Optional LoRA (Hu et al. 2021, arXiv 2106.09685) on our `llama_model.Llama`, through PEFT.

The Llama 3 paper fine-tunes every weight (§4.1); LoRA is this package's option for fine-tuning on
less memory. `add_lora` wraps the chosen linear layers of a `Llama` (Meta's module names: `wq`,
`wk`, `wv`, `wo`, `w1`, `w2`, `w3`, and `output`) with PEFT's LoRA layers: PEFT works on any
`nn.Module` given `target_modules` by name and no `task_type`, and its `PeftModel` passes
``peft_model(tokens, attention=...)`` straight to `Llama.forward`. Only the adapters train.
`merge_lora` folds them into the weights and returns a plain `Llama`, which
`llama_model.save_checkpoint` exports as any other.

The reference model of DPO can be the same model with its adapters switched off:
``with peft_model.disable_adapter(): ...`` runs exactly the base model's operations.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from llama_model import Llama

if TYPE_CHECKING:  # peft imports transformers (seconds): only when adapters are added or merged
    from peft import PeftModel

__all__ = ["LORA_TARGETS", "LoraSettings", "add_lora", "merge_lora"]

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
"""The linear layers of `Llama` that LoRA can adapt (Meta's names): the attention projections,
the SwiGLU matrices and the output projection."""


class LoraSettings(BaseModel):
    """Which layers of a `Llama` get LoRA adapters, and their shape. Not from the paper (Llama 3
    fine-tunes all weights): defaults are common LoRA practice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(16, gt=0)
    """Rank of each adapter: W + (alpha / r) · B A with A [r, in] and B [out, r]."""
    alpha: int = Field(32, gt=0)
    """Scale numerator: the adapter's output is multiplied by alpha / r (Hu et al. 2021, §4.1)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input while training (0: none, the run stays deterministic)."""
    target_modules: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    """Layers to adapt, by `Llama`'s module names (any of `LORA_TARGETS`): by default every
    attention and feed-forward matrix of every layer, the output projection left alone."""
    seed: int = 0
    """Seed of the adapters' initial A matrices (each drawn from its own generator, seeded by this
    and the parameter's name; B starts at zero, so the adapted model starts as the base)."""

    @model_validator(mode="after")
    def _check_targets(self) -> Self:
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; name some of {list(LORA_TARGETS)}")
        unknown = [name for name in self.target_modules if name not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"target_modules {unknown} are not linear layers of Llama; choose from "
                f"{list(LORA_TARGETS)}"
            )
        repeated = sorted({n for n in self.target_modules if self.target_modules.count(n) > 1})
        if repeated:
            raise ValueError(f"target_modules lists {repeated} more than once; name each once")
        return self


def add_lora(model: Llama, settings: LoraSettings) -> PeftModel:
    """Wrap `model`'s `settings.target_modules` with LoRA adapters; return the `PeftModel`.

    `model` is changed in place (its target layers become PEFT LoRA layers around the original
    ones) and frozen: only the adapters require gradients. Call the result like the model,
    ``peft_model(tokens, attention=...)``; ``with peft_model.disable_adapter():`` gives the base
    model. Adapters are float32 whatever the model's dtype (PEFT's default for bf16 and fp16
    models: their updates are too small for bf16). The A matrices are drawn as PEFT draws them
    (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) but reproducibly from
    `settings.seed` and each parameter's name, on the CPU whatever the device; B is zero.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"add_lora takes a llama_model.Llama, got {type(model).__name__}")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora it first")
    present = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    absent = [name for name in settings.target_modules if name not in present]
    if absent:
        raise ValueError(
            f"target_modules {absent} are not in this model (it has {sorted(present)}; a model "
            "with tied embeddings has no 'output')"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type=None,  # a plain nn.Module: PeftModel.forward passes every argument through
    )
    peft_model = get_peft_model(model, config)
    _init_adapters(model, settings.seed)
    return peft_model


@torch.no_grad()
def _init_adapters(model: nn.Module, seed: int) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) from a generator per parameter (seed, name); B = 0."""
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            bound = 1 / math.sqrt(parameter.shape[1])
            digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            value = torch.empty(parameter.shape, dtype=torch.float32)
            parameter.copy_(value.uniform_(-bound, bound, generator=generator))
        elif ".lora_B." in name:
            parameter.zero_()


@torch.no_grad()
def merge_lora(peft_model: PeftModel) -> Llama:
    """Fold the adapters into their layers' weights: W <- W + (alpha / r) · B A; return the plain
    `Llama` (every parameter trainable again), which `llama_model.save_checkpoint` exports.

    The merge is checked for NaNs before it is applied (PEFT's safe merge). `peft_model` is used up:
    its layers now belong to the returned model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    if not isinstance(base, Llama):
        raise TypeError(
            f"merge_lora takes a PeftModel around a llama_model.Llama, got one around "
            f"{type(base).__name__}"
        )
    # Layer by layer: PeftModel.merge_and_unload first reads the model's config as a transformers
    # config (`config.get(...)`), which our pydantic LlamaConfig is not; the layers' own merge
    # does the same arithmetic, and unload() then puts the merged base layers back in place.
    for module in base.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
    merged = peft_model.unload()
    if not isinstance(merged, Llama):  # unload returns the base model itself
        raise TypeError(f"PEFT unloaded a {type(merged).__name__}, not the Llama it wrapped")
    merged.requires_grad_(True)
    return merged
