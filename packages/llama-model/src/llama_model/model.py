"""The Llama 3 Transformer (§3.2 of "The Llama 3 Herd of Models", arXiv 2407.21783).

A dense decoder-only Transformer: pre-norm RMSNorm, grouped-query attention (8 key/value heads),
SwiGLU feed-forward, rotary position embeddings with θ = 500,000 and Llama 3.1 frequency scaling,
no biases. Which keys each query sees, and at which positions, is the caller's choice: an attention
backend (`llama_model.attention`: causal, packed documents, segments, a mask, a KV cache, or a
parallel package's own) passed as ``model(tokens, attention=...)``.

Module names follow Meta's reference (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`,
...); `checkpoint.py` maps Hugging Face names onto them. `layers` is keyed by the layer's index, and
`tok_embeddings`, `norm` and `output` may be None: a pipeline stage is this model with the parts it
does not hold removed (torchtitan's way), and runs this forward. RMSNorm and RoPE run through
`llama_kernels` (Triton on CUDA, its PyTorch reference elsewhere), which also holds the one
definition of the RoPE frequencies. RoPE rotates half-split pairs (x[i], x[i + head_dim/2]), the
Hugging Face layout: Hugging Face checkpoints load as they are, and the rows of Meta's wq and wk
(interleaved pairs) are permuted once at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_kernels import apply_rope, rms_norm, rope_frequencies
from llama_model.attention import AttentionBackend, Causal
from llama_model.config import LlamaConfig
from llama_model.initialization import init_parameters

__all__ = ["Attention", "FeedForward", "Llama", "RMSNorm", "TransformerBlock"]


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
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, inv_freq: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # Head counts come from the projections' widths (-1), not the config: under tensor
        # parallelism each rank holds n_heads / tp query and n_kv_heads / tp key/value heads.
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        positions = attention.positions(batch, seq_len, x.device)  # [B or 1, T]
        q, k = apply_rope(q, k, positions, inv_freq)  # half-split pairs, the HF layout
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        out = attention(self.layer_id, q, k, v)  # [B, local heads, T, head_dim]
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
        self, x: torch.Tensor, inv_freq: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), inv_freq, attention)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The Llama 3 model: ``model(tokens, attention=...) -> logits``.

    Construct under `torch.device("meta")` to get the structure without memory (a 405B model can be
    built and counted that way), then `to_empty(device=...)` and `init_weights(seed=...)` to train
    from scratch, or use `load_checkpoint` to fill it from a checkpoint.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(config, i) for i in range(config.n_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(config.dim, config.norm_eps)
        # With tied embeddings the output projection *is* tok_embeddings.weight (no second copy).
        self.output: nn.Linear | None = (
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
            if torch.is_inference_mode_enabled():  # a cached inference tensor would break a
                with torch.inference_mode(False):  # later forward that needs gradients
                    self._inv_freq[device] = self._rope_frequencies(device)
            else:
                self._inv_freq[device] = self._rope_frequencies(device)
        return self._inv_freq[device]

    def _rope_frequencies(self, device: torch.device) -> torch.Tensor:
        c, s = self.config, self.config.rope_scaling
        if s is None:
            return rope_frequencies(c.head_dim, c.rope_theta, device=device)
        return rope_frequencies(
            c.head_dim,
            c.rope_theta,
            scaling_factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_seq_len=s.original_max_seq_len,
            device=device,
        )

    def init_weights(self, seed: int = 0, *, std: float = 0.02) -> None:
        """Initialise for training from scratch, reproducibly from `seed` (`init_parameters`):
        each parameter from its own generator, so a part of the model (a pipeline stage, one
        rank's shard) can be initialised alone and still equal the whole model's."""
        init_parameters(self, self.config, seed=seed, std=std)

    def output_weight(self) -> torch.Tensor:
        """The [vocab_size, dim] output projection (the embedding table when tied)."""
        if self.output is not None:
            return self.output.weight
        if self.tok_embeddings is None:
            raise ValueError("this pipeline stage holds neither the output nor the embedding")
        return self.tok_embeddings.weight

    def hidden_states(
        self, tokens: torch.Tensor, *, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, dim] of token ids [B, T] (`attention` defaults to
        `Causal()`). On a pipeline stage: its input is the previous stage's hidden states when it
        has no embedding, and its output is un-normed when it has no final norm."""
        attention = Causal() if attention is None else attention
        if self.tok_embeddings is not None:
            _check_tokens(tokens, self.config)
            batch, seq_len = tokens.shape
            _check_positions(attention.positions(batch, seq_len, tokens.device), self.config)
            h = self.tok_embeddings(tokens)  # [B, T, dim]
        else:
            h = tokens  # a later pipeline stage: the previous stage's [B, T, dim]
        inv_freq = self.inv_freq(h.device)  # [head_dim / 2], float32
        for layer in self.layers.values():
            h = layer(h, inv_freq, attention)
        return h if self.norm is None else self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [..., dim] to vocabulary logits [..., vocab_size]."""
        if self.output is not None:  # called as a module so that tensor-parallel plans apply
            return self.output(hidden)
        return F.linear(hidden, self.output_weight())

    def forward(
        self, tokens: torch.Tensor, *, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for token ids [B, T] (`hidden_states`, then `logits`); a
        pipeline stage without the final norm returns its hidden states."""
        hidden = self.hidden_states(tokens, attention=attention)
        return hidden if self.norm is None else self.logits(hidden)


def _check_tokens(tokens: torch.Tensor, config: LlamaConfig) -> None:
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
    # Value checks read the data: on CPU only, so that a GPU step never waits on the host, and not
    # while torch.compile traces (a decode step must stay one graph).
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def _check_positions(positions: torch.Tensor, config: LlamaConfig) -> None:
    eager_on_cpu = positions.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager_on_cpu and int(positions.max()) >= config.max_seq_len:
        raise ValueError(
            f"position {int(positions.max())} is beyond max_seq_len {config.max_seq_len}; "
            "the model was configured for shorter sequences"
        )
