"""The Llama 3 Transformer (§3.2 of "The Llama 3 Herd of Models", arXiv 2407.21783).

A dense decoder-only Transformer: pre-norm RMSNorm, grouped-query attention (8 key/value heads),
SwiGLU feed-forward, rotary position embeddings with θ = 500,000 and Llama 3.1 frequency scaling,
no biases. Packed training sequences pass `document_ids` so that a token attends only to earlier
tokens of its own document (§3.2: "an attention mask that prevents self-attention between different
documents within the same sequence").

Module names follow Meta's reference (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`,
...); `checkpoint.py` maps Hugging Face names onto them. RMSNorm and RoPE run through
`llama_kernels` (Triton on CUDA, its PyTorch reference elsewhere), which also holds the one
definition of the RoPE frequencies. RoPE rotates half-split pairs (x[i], x[i + head_dim/2]), the
Hugging Face layout: Hugging Face checkpoints load as they are, and the rows of Meta's wq and wk
(interleaved pairs) are permuted once at load time.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from llama_kernels import apply_rope, rms_norm, rope_frequencies
from llama_model.cache import KVCache
from llama_model.config import LlamaConfig

__all__ = [
    "Attention",
    "FeedForward",
    "Llama",
    "RMSNorm",
    "TransformerBlock",
    "document_block_mask",
    "document_mask",
    "document_positions",
    "init_parameters",
    "initial_parameter",
    "packed_document_mask",
]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019) with a learned per-channel gain, no bias,
    no mean subtraction; statistics in float32 (`llama_kernels.rms_norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads queries share n_kv_heads keys and values (§3.2)."""

    def __init__(self, config: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Optional transform of the rotated keys and values [B, kv_heads, T, head_dim] before
        # attention. Context parallelism (llama_train) sets it to gather the other ranks' chunks.
        self.kv_hook: (
            Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
        ) = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # Head counts come from the projections' widths (-1), not the config: under tensor
        # parallelism each rank holds n_heads / tp query and n_kv_heads / tp key/value heads.
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, k, positions, inv_freq)  # half-split pairs, the HF layout
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, n_kv_heads, cached + T, head_dim]
        if self.kv_hook is not None:
            k, v = self.kv_hook(k, v)
        if isinstance(mask, BlockMask):  # packed documents on CUDA: block-sparse FlexAttention
            out = _flex_attention(q, k, v, mask)
            return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=k.shape[1] != q.shape[1],
        )  # [B, local heads, T, head_dim]
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, inv_freq, mask, is_causal, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The Llama 3 model: `model(tokens) -> logits`.

    Construct under `torch.device("meta")` to get the structure without memory (a 405B model can be
    built and counted that way), then `to_empty(device=...)` and `init_weights(seed=...)` to train
    from scratch, or use `load_checkpoint` to fill it from a checkpoint.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # With tied embeddings the output projection *is* tok_embeddings.weight (no second copy).
        self.output = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.dim, config.vocab_size, bias=False)
        )
        # RoPE inverse frequencies, float32, derived from the config on first use per device. Not a
        # buffer: `.to(bfloat16)` would round them and a meta-device build would leave them empty.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The float32 RoPE inverse frequencies [head_dim / 2] on `device` (computed once)."""
        if device not in self._inv_freq:
            c, s = self.config, self.config.rope_scaling
            if s is None:
                inv_freq = rope_frequencies(c.head_dim, c.rope_theta, device=device)
            else:
                inv_freq = rope_frequencies(
                    c.head_dim,
                    c.rope_theta,
                    scaling_factor=s.factor,
                    low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_seq_len=s.original_max_seq_len,
                    device=device,
                )
            self._inv_freq[device] = inv_freq
        return self._inv_freq[device]

    def init_weights(self, seed: int = 0, *, std: float = 0.02) -> None:
        """Initialise for training from scratch, reproducibly from `seed` (`init_parameters`):
        each parameter from its own generator, so a part of the model (a pipeline stage, one
        rank's shard) can be initialised alone and still equal the whole model's."""
        init_parameters(self, self.config, seed=seed, std=std)

    def output_weight(self) -> torch.Tensor:
        """The [vocab_size, dim] output projection (the embedding table when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, dim]; `forward` is `logits(hidden_states(...))`."""
        batch, seq_len = _check_tokens(tokens, self.config)
        explicit_positions = positions is not None
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(batch, seq_len)
        if positions is None:
            if start + seq_len > self.config.max_seq_len:
                raise ValueError(
                    f"{start} cached + {seq_len} new tokens exceed max_seq_len {self.config.max_seq_len}"
                )
            positions = torch.arange(start, start + seq_len, device=tokens.device)[
                None, :
            ]  # [1, T]
        else:
            positions = _check_positions(positions, batch, seq_len, self.config)

        # Attention pattern: plain causal where possible (fast SDPA paths), else an explicit mask.
        mask: torch.Tensor | BlockMask | None = None
        is_causal = seq_len > 1
        if attention_mask is not None:
            if document_ids is not None or cache is not None:
                raise ValueError(
                    "attention_mask replaces the mask built from document_ids and the cache's "
                    "causal mask; pass only one of attention_mask, document_ids, cache"
                )
            if not explicit_positions:
                raise ValueError(
                    "attention_mask needs explicit positions: its keys are not the tokens "
                    "0..T-1 of this call (context parallelism holds chunks of a longer sequence)"
                )
            mask, is_causal = _check_attention_mask(attention_mask, batch, seq_len), False
        elif document_ids is not None:
            if cache is not None:
                raise ValueError(
                    "document_ids (packed training sequences) cannot be combined with a KV cache; "
                    "decode one sequence per batch row instead"
                )
            mask, is_causal = packed_document_mask(document_ids, batch, seq_len), False
        elif start > 0 and seq_len > 1:  # chunked prefill: query i sees the cache and new keys <= i
            key_pos = torch.arange(start + seq_len, device=tokens.device)
            query_pos = torch.arange(start, start + seq_len, device=tokens.device)
            mask, is_causal = key_pos[None, :] <= query_pos[:, None], False  # [T, cached + T]

        inv_freq = self.inv_freq(tokens.device)  # [head_dim / 2], float32
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            h = layer(h, positions, inv_freq, mask, is_causal, cache)
        if cache is not None:
            cache.advance(seq_len)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [..., dim] to vocabulary logits [..., vocab_size]."""
        if self.output is not None:  # called as a module so that tensor-parallel plans apply
            return self.output(hidden)
        return F.linear(hidden, self.tok_embeddings.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for token ids [B, T].

        positions: [B, T] or [1, T] RoPE positions; default 0..T-1 (after what `cache` holds).
        document_ids: [B, T] ids of the packed document each token belongs to; a token then
            attends only to earlier tokens with the same id (§3.2). Not combinable with `cache`.
            Positions are not reset per document by this; pass `positions=document_positions(ids)`
            for that.
        attention_mask: an explicit boolean mask [B or 1, 1, T, T_keys] (True = attend) for
            callers whose keys are not just these T tokens: context parallelism gathers the other
            ranks' keys through `Attention.kv_hook`. Replaces `document_ids`; not with `cache`.
        cache: a `KVCache`; the new keys and values are appended and the cache advances by T.
        """
        hidden = self.hidden_states(
            tokens,
            positions=positions,
            document_ids=document_ids,
            attention_mask=attention_mask,
            cache=cache,
        )
        return self.logits(hidden)


_PARAMETER_NAME = re.compile(
    r"tok_embeddings\.weight|output\.weight|norm\.weight|layers\.(\d+)\."
    r"(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight"
)


def initial_parameter(
    config: LlamaConfig,
    name: str,
    shape: Sequence[int],
    *,
    seed: int,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The from-scratch initial value of the `Llama` parameter `name` (e.g.
    ``"layers.3.feed_forward.w2.weight"``), full size `shape`.

    The paper does not state its initialisation; we use GPT-2's (Radford et al. 2019): normal(0,
    std) for embeddings and projections, with the residual-branch outputs (wo, w2) scaled by
    1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth; norm gains 1.
    The draw comes from a generator of `device`'s type seeded by `seed` and `name` alone, so it
    does not depend on which other parameters a process holds: that is what lets a sharded or
    pipelined model be initialised in place (on the meta device first, then shard by shard) and
    start from exactly the weights of a single-process run on the same device type (on CUDA, the
    same GPU model: torch's random kernels size their grid by the number of SMs, and the values
    follow the grid).
    """
    match = _PARAMETER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a parameter name of Llama (e.g. 'layers.0.attention.wq.weight')"
        )
    if match.group(1) is not None and int(match.group(1)) >= config.n_layers:
        raise ValueError(f"{name!r}: the config has {config.n_layers} layers")
    value = torch.empty(tuple(shape), dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return value.fill_(1.0)
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=value.device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # a non-negative int64
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / math.sqrt(2 * config.n_layers)
    return value.normal_(0.0, std, generator=generator)


# Prefixes that wrappers put into parameter names: activation checkpointing, `torch.compile(module)`.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@torch.no_grad()
def init_parameters(
    module: nn.Module, config: LlamaConfig, *, seed: int, std: float = 0.02
) -> None:
    """Set every parameter of `module` to its `initial_parameter` value.

    `module` is a `Llama` or any module whose parameters carry `Llama`'s names (a pipeline stage),
    possibly wrapped by activation checkpointing or `torch.compile` (their name prefixes are
    ignored). A `DTensor` parameter (tensor parallel, FSDP2) gets its own shard of the full value,
    which every rank generates identically, so no communication is needed and memory peaks at one
    full parameter. Build large models on the meta device, shard them, `to_empty(device=...)`,
    then call this.
    """
    distributed = torch.distributed.is_available()
    if distributed:
        from torch.distributed.tensor import DTensor, distribute_tensor
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            raise RuntimeError(
                "initialising needs real storage: call model.to_empty(device=...) first"
            )
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        sharded = param if distributed and isinstance(param, DTensor) else None
        local = sharded.to_local() if sharded is not None else param
        value = initial_parameter(
            config, name, param.shape, seed=seed, std=std, dtype=param.dtype, device=local.device
        )
        if sharded is not None:  # keep this rank's shard of the full value
            value = distribute_tensor(
                value, sharded.device_mesh, sharded.placements, src_data_rank=None
            ).to_local()
        local.copy_(value)


def document_mask(document_ids: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T]: query i sees key j iff j <= i and both are in one document."""
    if document_ids.shape != (batch, seq_len):
        raise ValueError(
            f"document_ids must have the tokens' shape {(batch, seq_len)}, got {tuple(document_ids.shape)}"
        )
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    return (same_doc & causal)[:, None]  # [B, 1, T, T]: broadcast over heads


def document_block_mask(document_ids: torch.Tensor, batch: int, seq_len: int) -> BlockMask:
    """The same pattern as `document_mask` as a FlexAttention `BlockMask`: 128×128 blocks that no
    query of a block may see are skipped, so packed short documents cost what they attend to, and
    no dense [B, 1, T, T] mask is built (16 GiB at 128K tokens)."""
    if document_ids.shape != (batch, seq_len):
        raise ValueError(
            f"document_ids must have the tokens' shape {(batch, seq_len)}, got {tuple(document_ids.shape)}"
        )

    def same_document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv <= q) & (document_ids[b, q] == document_ids[b, kv])

    # Compiled on CUDA so that the block structure is computed without materialising the dense
    # [B, T, T] pattern (eager create_block_mask builds it: 16 GiB per row at 128K tokens).
    build: Callable[..., BlockMask] = create_block_mask
    if document_ids.is_cuda and not torch.compiler.is_compiling():
        if not _COMPILED_BLOCK_MASK:
            _COMPILED_BLOCK_MASK.append(torch.compile(create_block_mask))
        build = _COMPILED_BLOCK_MASK[0]
    return build(same_document_causal, batch, None, seq_len, seq_len, device=document_ids.device)


_COMPILED_BLOCK_MASK: list[Callable[..., BlockMask]] = []


def packed_document_mask(
    document_ids: torch.Tensor, batch: int, seq_len: int
) -> torch.Tensor | BlockMask:
    """The causal same-document mask in the form attention runs fastest with on this device:
    a FlexAttention `BlockMask` on CUDA, the dense boolean mask elsewhere (see `_use_flex`)."""
    if _use_flex(document_ids.device):
        return document_block_mask(document_ids, batch, seq_len)
    return document_mask(document_ids, batch, seq_len)


def _use_flex(device: torch.device) -> bool:
    """Packed documents use FlexAttention on CUDA (`LLAMA_ATTENTION=auto`, the default) or
    everywhere (`flex`); `sdpa` always uses the dense mask with scaled_dot_product_attention."""
    choice = os.environ.get("LLAMA_ATTENTION", "auto")
    if choice not in ("auto", "sdpa", "flex"):
        raise ValueError(f"LLAMA_ATTENTION must be auto, sdpa or flex, got {choice!r}")
    return choice == "flex" or (choice == "auto" and device.type == "cuda")


_COMPILED_FLEX: list[Callable[..., Any]] = []


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask
) -> torch.Tensor:
    """FlexAttention as a fused kernel: traced in place inside a compiled block, else through a
    once-compiled wrapper on CUDA (eager flex_attention is an unfused reference, used on CPU)."""
    gqa = k.shape[1] != q.shape[1]
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0](q, k, v, block_mask=mask, enable_gqa=gqa)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document boundary of a packed [B, T] sequence.

    Documents must be contiguous runs of one id. Pass the result as `positions` to make every packed
    document see the positions it would see alone.
    """
    batch, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, seq_len)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def _check_tokens(tokens: torch.Tensor, config: LlamaConfig) -> tuple[int, int]:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
    batch, seq_len = tokens.shape
    if seq_len == 0 or batch == 0:
        raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)}); pass at least one token")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if seq_len > config.max_seq_len:
        raise ValueError(
            f"sequence length {seq_len} exceeds max_seq_len {config.max_seq_len}; "
            "truncate the input or use a config with a larger max_seq_len"
        )
    # Value checks read the data: done on CPU only, so that a GPU step never waits on the host.
    if tokens.device.type == "cpu":
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    return batch, seq_len


def _check_attention_mask(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    if (
        mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[0] not in (1, batch)
        or mask.shape[1] != 1
        or mask.shape[2] != seq_len
    ):
        raise ValueError(
            f"attention_mask must be a boolean [{batch} or 1, 1, {seq_len}, keys] tensor, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return mask


def _check_positions(
    positions: torch.Tensor, batch: int, seq_len: int, config: LlamaConfig
) -> torch.Tensor:
    if positions.dim() == 1:
        positions = positions[None, :]
    if (
        positions.dim() != 2
        or positions.shape[-1] != seq_len
        or positions.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f"positions must have shape [{batch} or 1, {seq_len}], got {tuple(positions.shape)}"
        )
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if positions.device.type == "cpu":  # value checks on CPU only (no GPU→host sync)
        low, high = int(positions.min()), int(positions.max())
        if low < 0:
            raise ValueError(f"position {low} is negative; positions count from 0")
        if high >= config.max_seq_len:
            raise ValueError(
                f"position {high} is beyond max_seq_len {config.max_seq_len}; "
                "the model was configured for shorter sequences"
            )
    return positions
