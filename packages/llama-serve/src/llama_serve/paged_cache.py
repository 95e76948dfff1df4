"""The paged KV cache: fixed-size blocks from one pool, a block table per sequence (PagedAttention,
Kwon et al. 2023, which §4.2.2 of the Llama 3 paper uses for rejection sampling).

Two halves:

- `BlockPool` is bookkeeping only (no tensors): which blocks are free, how many sequences hold
  each (reference counts, so that the samples of one prompt share its blocks), and the prefix
  cache: a full block is keyed by a digest of its tokens and of every token before it, so a later
  request that starts with the same tokens reuses the block instead of computing it again. A block
  nobody holds stays in the prefix cache until the pool needs it (least recently freed first).
- `PagedKVCache` holds the tensors, keys and values [n_layers, n_kv_heads, num_blocks, block_size,
  head_dim] (heads outermost, so that gathering a batch's blocks gives each head's keys as one
  contiguous [B, positions, head_dim] matrix for the attention matmuls), and `PagedKVCache.view(block_tables)` is a `llama_model.KVCacheProtocol` for one
  forward: position p of row b lives in block ``block_tables[b, p // block_size]`` at offset
  ``p % block_size``, and `update` returns each row's blocks gathered in table order, so slot s
  holds position s and `llama_model.CachedAttention` masks the rest. Block 0 is never handed out:
  padding rows and unused table entries point at it, and whatever they write there is never read
  unmasked.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from llama_model import LlamaConfig

__all__ = ["NULL_BLOCK", "BlockPool", "PagedKVCache", "block_digest"]

NULL_BLOCK = 0
"""The block that padding points at; `BlockPool` never hands it out."""


def block_digest(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: a 128-bit BLAKE2b digest of the previous block's
    digest (None for the first block) and this block's token ids, so equal keys mean equal
    prefixes (a collision would need 2^64 blocks)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(b"".join(int(token).to_bytes(4, "little") for token in tokens))
    return digest.digest()


class BlockPool:
    """Free list, reference counts and prefix cache of `num_blocks` blocks (block 0 reserved)."""

    def __init__(self, num_blocks: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (block 0 is reserved for padding), got "
                f"{num_blocks}; give it more memory"
            )
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Blocks nobody holds, in the order to reuse them: uncached blocks first, then cached
        # blocks, least recently freed first (their contents stay valid until reused).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._digest_of: dict[int, bytes] = {}  # block -> its prefix-cache key
        self._block_of: dict[bytes, int] = {}  # prefix-cache key -> block

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (cached but unused blocks included)."""
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Every block but the reserved one."""
        return self.num_blocks - 1

    def allocate(self) -> int:
        """A block held once by the caller; its previous contents are forgotten."""
        if not self._free:
            raise RuntimeError("no free KV cache block (the scheduler checks num_free first)")
        block, _ = self._free.popitem(last=False)
        digest = self._digest_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]
        self.ref_count[block] = 1
        return block

    def retain(self, block: int) -> None:
        """One more holder of `block` (a sample sharing its prompt, a prefix-cache hit)."""
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; a block nobody holds goes back to the pool (its cached contents stay
        reusable until the pool hands it out again)."""
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"KV cache block {block} released more often than held")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self._free[block] = None  # most recently freed: reused last
            if block not in self._digest_of:
                self._free.move_to_end(block, last=False)  # holds nothing reusable: reused first

    def lookup(self, digest: bytes) -> int | None:
        """The block caching the full block keyed `digest`, if any."""
        return self._block_of.get(digest) if self.enable_prefix_caching else None

    def register(self, block: int, digest: bytes) -> None:
        """Record that `block` (full, held) holds the tokens keyed `digest`."""
        if not self.enable_prefix_caching or digest in self._block_of or block in self._digest_of:
            return  # an equal block is cached already (two requests computed it at once)
        self._block_of[digest] = block
        self._digest_of[block] = digest

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after the weights change)."""
        self._digest_of.clear()
        self._block_of.clear()


class PagedKVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_size` positions."""

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        shape = (config.n_layers, config.n_kv_heads, num_blocks, block_size, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Written in place by a compiled decode step (CUDA graphs capture static addresses).
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        self.block_size = block_size
        # Reused by `gather` (a fresh multi-MiB tensor per layer costs more in page faults on a
        # CPU than the copy itself).
        self._workspace: dict[str, torch.Tensor] = {}

    @staticmethod
    def bytes_per_block(config: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
        """Memory of one block: keys and values of every layer."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * itemsize

    def copy_block(self, source: int, target: int) -> None:
        """Copy-on-write: `target` gets `source`'s keys and values in every layer."""
        self.keys[:, :, target] = self.keys[:, :, source]
        self.values[:, :, target] = self.values[:, :, source]

    def write(
        self, layer_id: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Write keys/values [n_kv_heads, N, head_dim] at flat slots [N] (block * block_size +
        offset) of layer `layer_id`."""
        for cache, new in ((self.keys, keys), (self.values, values)):
            layer = cache[layer_id]
            layer.view(layer.shape[0], -1, layer.shape[-1])[:, slots] = new.to(layer.dtype)

    def gather(
        self, layer_id: int, block_tables: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `layer_id` through `block_tables` [B, W], each [n_kv_heads,
        B, W * block_size, head_dim] (contiguous), in a workspace that the next call reuses."""
        out = []
        for name, cache in (("keys", self.keys), ("values", self.values)):
            layer = cache[layer_id]
            heads, dim = layer.shape[0], layer.shape[-1]
            shape = (heads, block_tables.numel(), self.block_size * dim)
            numel = shape[0] * shape[1] * shape[2]
            buffer = self._workspace.get(name)
            if buffer is None or buffer.numel() < numel:
                buffer = self._workspace[name] = torch.empty(
                    numel, dtype=layer.dtype, device=layer.device
                )
            gathered = buffer[:numel].view(shape)
            torch.index_select(
                layer.flatten(2), 1, block_tables.flatten(), out=gathered
            )  # [heads, B * W, block_size * D]
            out.append(gathered.view(heads, block_tables.shape[0], -1, dim))
        return out[0], out[1]

    def view(self, block_tables: torch.Tensor) -> PagedView:
        """The cache seen through `block_tables` [B, W] (block ids; `NULL_BLOCK` pads)."""
        return PagedView(self, block_tables)


class PagedView:
    """`PagedKVCache` through a block table: a `llama_model.KVCacheProtocol` of B rows of
    W * block_size positions (what `llama_model.CachedAttention` runs a compiled decode step on)."""

    def __init__(self, cache: PagedKVCache, block_tables: torch.Tensor) -> None:
        self.cache = cache
        self.block_tables = block_tables

    @property
    def max_seq_len(self) -> int:
        return self.block_tables.shape[1] * self.cache.block_size

    def update(
        self, layer_id: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [B, n_kv_heads, T, head_dim] at positions [B or 1, T] into their
        rows' blocks; return the rows' blocks in table order [B, n_kv_heads, W * block_size,
        head_dim] (a gathered copy)."""
        batch = keys.shape[0]
        size = self.cache.block_size
        positions = positions.expand(batch, -1)
        blocks = self.block_tables.gather(1, positions // size)  # [B, T]
        offsets = positions % size  # [B, T]
        layer_keys, layer_values = self.cache.keys[layer_id], self.cache.values[layer_id]
        layer_keys[:, blocks, offsets] = keys.transpose(0, 1).to(layer_keys.dtype)  # [H, B, T, D]
        layer_values[:, blocks, offsets] = values.transpose(0, 1).to(layer_values.dtype)
        return _in_table_order(layer_keys, self.block_tables), _in_table_order(
            layer_values, self.block_tables
        )


def _in_table_order(layer: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[H, num_blocks, block_size, D] gathered by [B, W] -> [B, H, W * block_size, D]: a fresh
    tensor by advanced indexing, which `torch.compile` traces (`PagedKVCache.gather` writes into
    a reused workspace with `index_select(out=...)` instead, for the eager packed step)."""
    gathered = layer[:, block_tables]  # [H, B, W, block_size, D]
    return gathered.flatten(2, 3).transpose(0, 1)
