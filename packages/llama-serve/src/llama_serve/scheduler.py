"""Continuous batching: which sequences run in the next forward, and with how many tokens.

A `Sequence` is one sample of a request: its tokens (prompt, then what it generated) and the
blocks holding their keys and values. `num_computed` of its tokens are in the cache; a step feeds
the next ones (a chunk of the prompt, or the one token sampled last) and, when that reaches the
end, samples a new token. So prefill, chunked prefill, decode and recomputation after preemption
are one operation (as in vLLM's V1 scheduler).

Each `Scheduler.schedule` call:
1. running sequences first, oldest first: each gets min(its remaining tokens, the token budget
   left) tokens; when the pool has no block for them, the newest running sequence is preempted
   (its blocks freed, itself back at the head of the queue to be recomputed later; its output is
   unchanged, since its sampler's state is kept);
2. then waiting sequences, oldest first, while the budget, `max_num_seqs` and the free blocks
   allow: full blocks of their prefix found in the prefix cache are taken as computed.
The samples of a request after the first wait until the first has prefilled the prompt; then they
share its blocks (`fork`) and a block is copied only when a sample writes into a shared one.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from llama_serve.paged_cache import BlockPool, block_digest
from llama_serve.params import SamplingParams

__all__ = ["ScheduledChunk", "Scheduler", "Sequence", "Status"]


class Status(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks freed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request, and the cache blocks holding its tokens."""

    request_id: str
    index: int
    """Which of the request's n samples this is."""
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    arrival: int
    """Order of arrival (ties: the sample index): who is scheduled first and preempted last."""
    output: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the sequence's full blocks, in order."""
    num_computed: int = 0
    """Tokens whose keys and values are in `blocks`."""
    num_cached: int = 0
    """Prompt tokens found in the prefix cache when the sequence was admitted."""
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    num_preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return self.num_tokens - self.num_computed


@dataclass
class ScheduledChunk:
    """`sequence` runs `num_tokens` tokens from position `start`; `samples` when they reach the
    end of its tokens (the last one's logits give the next token)."""

    sequence: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.sequence.num_tokens


class Scheduler:
    """Queues of sequences and the block pool they draw from (bookkeeping only, no tensors)."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.followers: dict[str, list[Sequence]] = {}  # samples waiting for their prompt
        self.num_preemptions = 0
        self._arrivals = itertools.count()
        self.copies: list[tuple[int, int]] = []  # copy-on-write (source, target), run first

    # -------------------------------------------------------------------------------- queues

    def next_arrival(self) -> int:
        return next(self._arrivals)

    def add(self, samples: list[Sequence]) -> None:
        """Queue a request's samples: the first prefills the prompt, the rest follow it."""
        self.waiting.append(samples[0])
        if len(samples) > 1:
            self.followers[samples[0].request_id] = samples[1:]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, sequence: Sequence) -> None:
        """Free a finished or aborted sequence's blocks (its followers too, if still waiting)."""
        if sequence.status is Status.RUNNING:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self._free_blocks(sequence)
        sequence.status = Status.FINISHED

    def fork(self, leader: Sequence) -> list[Sequence]:
        """The samples waiting on `leader`'s prompt, now holding its blocks (shared)."""
        followers = self.followers.pop(leader.request_id, [])
        for follower in followers:
            for block in leader.blocks:
                self.pool.retain(block)
            follower.blocks = list(leader.blocks)
            follower.digests = list(leader.digests)
            follower.num_computed = leader.num_computed
            follower.num_cached = leader.num_cached
            follower.status = Status.RUNNING
            self.running.append(follower)
        return followers

    # ---------------------------------------------------------------------------- scheduling

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of the next forward (see the module docstring). Copy-on-write block
        copies that must run before it are in `self.copies`."""
        self.copies = []
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        self.running.sort(key=lambda s: (s.arrival, s.index))
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            num_tokens = min(sequence.remaining, budget)
            while not self._make_room(sequence, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is sequence:
                    break
            else:
                chunks.append(ScheduledChunk(sequence, sequence.num_computed, num_tokens))
                budget -= num_tokens
                index += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if sequence.num_computed == 0:
                self._take_cached_prefix(sequence)
            num_tokens = min(sequence.remaining, budget)
            if not self._make_room(sequence, num_tokens):
                self._free_blocks(sequence)  # a waiting sequence holds no blocks
                if not self.running and not chunks:
                    raise RuntimeError(  # add-time checks make this unreachable
                        f"request {sequence.request_id!r} cannot fit in an empty KV cache"
                    )
                break
            self.waiting.popleft()
            sequence.status = Status.RUNNING
            self.running.append(sequence)
            chunks.append(ScheduledChunk(sequence, sequence.num_computed, num_tokens))
            budget -= num_tokens
        return chunks

    def computed(self, chunk: ScheduledChunk) -> None:
        """Record that `chunk` ran: its tokens are cached, and its full blocks can be shared."""
        sequence = chunk.sequence
        sequence.num_computed = chunk.start + chunk.num_tokens
        tokens = sequence.tokens
        while (len(sequence.digests) + 1) * self.block_size <= sequence.num_computed:
            number = len(sequence.digests)
            parent = sequence.digests[-1] if sequence.digests else None
            block_tokens = tokens[number * self.block_size : (number + 1) * self.block_size]
            digest = block_digest(parent, block_tokens)
            sequence.digests.append(digest)
            self.pool.register(sequence.blocks[number], digest)

    def _make_room(self, sequence: Sequence, num_tokens: int) -> bool:
        """Give `sequence` writable blocks for positions num_computed .. + num_tokens - 1 (new
        blocks, and a private copy of a shared block it writes into); False if the pool is short."""
        end = sequence.num_computed + num_tokens
        first = sequence.num_computed // self.block_size
        needed = -(-end // self.block_size) - len(sequence.blocks)
        shared = first < len(sequence.blocks) and self.pool.ref_count[sequence.blocks[first]] > 1
        if needed + shared > self.pool.num_free:
            return False
        if shared:
            copy = self.pool.allocate()
            self.copies.append((sequence.blocks[first], copy))
            self.pool.release(sequence.blocks[first])
            sequence.blocks[first] = copy
        sequence.blocks.extend(self.pool.allocate() for _ in range(needed))
        return True

    def _take_cached_prefix(self, sequence: Sequence) -> None:
        """Hold the prefix cache's blocks for the sequence's leading full blocks. At least one
        token is left to compute: its logits give the next token."""
        tokens = sequence.tokens
        parent: bytes | None = None
        usable = (len(tokens) - 1) // self.block_size
        for number in range(usable):
            digest = block_digest(
                parent, tokens[number * self.block_size : (number + 1) * self.block_size]
            )
            block = self.pool.lookup(digest)
            if block is None:
                break
            self.pool.retain(block)
            sequence.blocks.append(block)
            sequence.digests.append(digest)
            parent = digest
        sequence.num_computed = len(sequence.blocks) * self.block_size
        if not sequence.output:  # a first admission, not a recomputation
            sequence.num_cached = sequence.num_computed

    def _preempt(self, sequence: Sequence) -> None:
        """Free `sequence`'s blocks and queue it to be recomputed first."""
        self.running.remove(sequence)
        self._free_blocks(sequence)
        sequence.status = Status.WAITING
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def _free_blocks(self, sequence: Sequence) -> None:
        for block in sequence.blocks:
            self.pool.release(block)
        sequence.blocks = []
        sequence.digests = []
        sequence.num_computed = 0
