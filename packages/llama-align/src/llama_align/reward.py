"""The reward model of §4.1.2 of "The Llama 3 Herd of Models": a Llama backbone with a scalar head,
trained on ranked responses with every response to a prompt in one row.

§4.1.2: "we concatenate the prompt and multiple responses into a single row with responses randomly
shuffled"; each response attends to the prompt and to itself only (`llama_model.Segments`), and
is positioned right after the prompt, so its reward equals the one it gets alone in a row of its
own, while the prompt is encoded once instead of once per response. The reward of a response is
the head's score at its last token (its terminator, `<|eot_id|>` or `<|eom_id|>`), where a causal
model has read the whole response: the position Hugging Face's `LlamaForSequenceClassification`
pools (the last non-padding token).

- `RewardModel`: ``model(tokens, attention=...) -> [B, T]`` scores of every position.
- `RewardObjective`: the ranking loss, Σ over ordered pairs (i above j) of -log σ(r_i - r_j)
  (Bradley-Terry, as in Llama 2 without the margin term, which §4.1.2 removes), for the training
  loop (`llama_align.objective.Objective`); ``one_row=False`` is the one-row-per-response
  baseline the benchmark compares against.
- `save_reward_model` / `load_reward_model`: the Hugging Face `LlamaForSequenceClassification`
  directory (transformers, TRL and vLLM read it), safetensors only.
- `RewardScorer`: the rewards of K responses to one prompt, in as few rows as fit (rejection
  sampling, §4.1.3); `pair_accuracy`: the held-out fraction of ordered pairs ranked correctly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import secrets
import shutil
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llama_align.data import RankedExample, encode_prompt, encode_response
from llama_align.objective import Batch, LossSums, Metrics
from llama_model import (
    AttentionBackend,
    AttentionKernel,
    Causal,
    ChatFormat,
    Llama,
    LlamaConfig,
    Message,
    Segments,
    Tokenizer,
    check_checkpoint_target,
    check_state_dict,
    config_from_hf,
    from_hf_name,
    publish_directory,
    read_hf_tensors,
    save_checkpoint,
    to_hf_name,
)

__all__ = [
    "RewardModel",
    "RewardObjective",
    "RewardScorer",
    "load_reward_model",
    "pair_accuracy",
    "save_reward_model",
]

# `<|finetune_right_pad_id|>` (128000 + 4): Meta's reference pad id, `llama_model.Tokenizer.pad_id`,
# written as the export's pad_token_id when no tokenizer is given for the Llama 3 vocabulary.
_LLAMA3_VOCAB = 128_256
_LLAMA3_PAD = 128_004
_SCORE = "score.weight"  # the head's name in our state dict and in Hugging Face's


# --------------------------------------------------------------------------------------------
# The model


class RewardModel(nn.Module):
    """A `llama_model.Llama` backbone (without its LM head) and a scalar head on its final
    hidden states: ``model(tokens, attention=...) -> [B, T]``, the score of every position.

    Build one from a causal LM with `RewardModel.from_backbone`, or read an exported one with
    `load_reward_model`. Parameter names are ``backbone.<Llama name>`` and ``score.weight``.
    """

    def __init__(self, backbone: Llama, score: nn.Linear) -> None:
        """Wrap `backbone` and `score` (an ``nn.Linear(dim, 1, bias=False)``) as they are.

        Takes ownership of `backbone`: its LM head (``output``) is removed, because a reward
        model never uses it and an unused parameter would stall DistributedDataParallel.
        """
        super().__init__()
        if backbone.tok_embeddings is None or backbone.norm is None:
            raise ValueError(
                "the backbone is a pipeline stage (no embedding or no final norm); a reward model "
                "needs the whole Llama"
            )
        expected = (1, backbone.config.dim)
        if score.bias is not None or tuple(score.weight.shape) != expected:
            raise ValueError(
                f"score must be nn.Linear({backbone.config.dim}, 1, bias=False), got weight "
                f"{tuple(score.weight.shape)} and bias={score.bias is not None}"
            )
        backbone.output = None  # the LM head: no part of a reward model
        self.backbone: Llama = backbone
        self.score: nn.Linear = score

    @classmethod
    def from_backbone(cls, llama: Llama, *, seed: int = 0) -> RewardModel:
        """A reward model on a causal LM's `llama` (whose LM head is dropped), with a new head.

        The head is drawn from N(0, 1/(dim + 1)) with a generator seeded by `seed` (the reward
        head initialisation of Stiennon et al. 2020, "Learning to summarize from human
        feedback"): the final RMSNorm gives hidden states of about unit scale, so the first
        rewards are of order 1, and unlike a zero head the backbone gets gradients from the first
        step. Same seed and backbone, same model; the global random generator is not touched.
        """
        weight = llama.tok_embeddings.weight if llama.tok_embeddings is not None else None
        if weight is None:
            raise ValueError("the backbone is a pipeline stage without its embedding")
        dim = llama.config.dim
        # Built on the meta device and then allocated: nn.Linear's own init would draw from the
        # global generator, which a reproducible head must not touch.
        score = nn.Linear(dim, 1, bias=False, device="meta", dtype=weight.dtype)
        score = score.to_empty(device=weight.device)
        if not weight.is_meta:
            generator = torch.Generator().manual_seed(seed)
            init = torch.randn(1, dim, generator=generator, dtype=torch.float64)
            with torch.no_grad():
                score.weight.copy_(init / math.sqrt(dim + 1))
        return cls(llama, score)

    @property
    def config(self) -> LlamaConfig:
        """The backbone's `llama_model.LlamaConfig`."""
        return self.backbone.config

    def forward(
        self, tokens: torch.Tensor, *, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Scores [B, T] (the model's dtype) of token ids [B, T]: the head on the final hidden
        state of every position. `attention` defaults to `llama_model.Causal()`."""
        hidden = self.backbone.hidden_states(tokens, attention=attention)  # [B, T, dim]
        return self.score(hidden).squeeze(-1)  # [B, T]


# --------------------------------------------------------------------------------------------
# Row layout


@dataclass(frozen=True)
class _Layout:
    """Rows of token ids with the attention ids they need, and where each reward is read."""

    tokens: torch.Tensor  # [B, T]
    segment_ids: torch.Tensor  # [B, T]: 0 prompt (and padding), k > 0 the row's k-th response
    document_ids: torch.Tensor  # [B, T]: 0 the row's content, 1 its padding
    rows: torch.Tensor  # [R]: the row of each reward, in the order the responses were given
    columns: torch.Tensor  # [R]: the column of each response's last token


def _layout(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    order: Sequence[Sequence[int]],
    pad_id: int,
) -> _Layout:
    """Lay out rows of (prompt, responses): row b holds its prompt, then its responses in the
    order `order[b]` (a permutation of their indices), right-padded to the longest row.

    The padding is a document of its own (segment 0: it attends causally to itself only), so no
    query is left without a key (no NaN anywhere) and nothing real sees it. Rewards are listed
    row by row, each row's responses in their given (not their laid-out) order.
    """
    lengths = [len(p) + sum(len(r) for r in rs) for p, rs in rows]
    width = max(lengths)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
    document_ids = torch.ones((len(rows), width), dtype=torch.long)
    reward_rows: list[int] = []
    reward_columns: list[int] = []
    for b, ((prompt, responses), row_order) in enumerate(zip(rows, order, strict=True)):
        document_ids[b, : lengths[b]] = 0
        tokens[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        last = [0] * len(responses)
        start = len(prompt)
        for segment, index in enumerate(row_order, start=1):
            response = responses[index]
            end = start + len(response)
            tokens[b, start:end] = torch.tensor(response, dtype=torch.long)
            segment_ids[b, start:end] = segment
            last[index] = end - 1
            start = end
        reward_rows.extend([b] * len(responses))
        reward_columns.extend(last)
    return _Layout(
        tokens,
        segment_ids,
        document_ids,
        torch.tensor(reward_rows, dtype=torch.long),
        torch.tensor(reward_columns, dtype=torch.long),
    )


def _shuffled(example: RankedExample, seed: int) -> list[int]:
    """A permutation of the example's responses, from `seed` and the example's tokens only: the
    same example is laid out the same way in every run, micro-batch and process."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8)
    for part in (example.prompt, *example.responses):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(array("q", part.tokens).tobytes())
    order = list(range(len(example.responses)))
    random.Random(int.from_bytes(digest.digest(), "little")).shuffle(order)
    return order


def _check_example(index: int, example: RankedExample) -> None:
    """Refuse an example the ranking loss cannot use, naming it and what to change."""
    count = len(example.responses)
    if count < 2:
        raise ValueError(
            f"example {index} has {count} response(s); the reward model ranks at least 2 "
            "responses to one prompt: drop it or add a response"
        )
    if len(example.ranks) != count:
        raise ValueError(
            f"example {index} has {count} responses but {len(example.ranks)} ranks; give one "
            "rank per response"
        )
    if min(example.ranks) < 0:
        raise ValueError(f"example {index} has rank {min(example.ranks)}; ranks are >= 0 (0 best)")
    if len(set(example.ranks)) < 2:
        raise ValueError(
            f"every response of example {index} has rank {example.ranks[0]}: no pair to learn "
            "from; drop it or rank its responses differently"
        )
    if not example.prompt.tokens:
        raise ValueError(f"example {index} has an empty prompt")
    for k, response in enumerate(example.responses):
        if not response.tokens or not response.format_mask[-1]:
            raise ValueError(
                f"response {k} of example {index} does not end with its terminator "
                "(<|eot_id|> or <|eom_id|>), where its reward is read; encode it with "
                "llama_align.encode_response"
            )


# --------------------------------------------------------------------------------------------
# The objective


class RewardObjective:
    """The ranking loss of §4.1.2 for the training loop (`Objective[RankedExample]`).

    For every example, each ordered pair (i, j) with rank_i < rank_j (0 is the best; equal ranks
    make no pair) adds -log σ(r_i - r_j); the loop divides the sum by the number of pairs in the
    global batch (denominator ``"pairs"``). Metrics: ``pair_accuracy`` (r_i > r_j), ``margin``
    (r_i - r_j, per pair) and ``mean_reward`` (per response).

    `one_row=True` (the paper's layout): one row per example, the prompt then every response,
    shuffled with a generator seeded by `seed` and the example's tokens; each response sees the
    prompt and itself (`llama_model.Segments`). `one_row=False`: one row per response (prompt +
    response, causal attention), the baseline; both give the same rewards. Rows are right-padded
    with `pad_id` (padding is attended by nothing real, so its id changes no reward; 0 is a valid
    id in every vocabulary).
    """

    def __init__(
        self,
        *,
        one_row: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        kernel: AttentionKernel = "auto",
    ) -> None:
        """See the class docstring; `kernel` picks how `Segments` is computed (dense on CPU,
        FlexAttention on CUDA with ``"auto"``)."""
        if pad_id < 0:
            raise ValueError(f"pad_id must be a token id (>= 0), got {pad_id}")
        self.one_row = one_row
        self.seed = seed
        self.pad_id = pad_id
        self.kernel: AttentionKernel = kernel

    def collate(self, examples: Sequence[RankedExample]) -> Batch:
        """Rows of token ids (see the class docstring), where each reward is read, and the pairs.

        Keys: ``tokens`` [B, T]; with `one_row`, ``segment_ids`` and ``document_ids`` [B, T];
        ``reward_rows``/``reward_columns`` [R] (every response, example by example, in its given
        order); ``better``/``worse`` [P] (indices into the R rewards of each ordered pair).
        """
        if not examples:
            raise ValueError("collate got no examples; a micro-batch holds at least one")
        better: list[int] = []
        worse: list[int] = []
        offset = 0
        for index, example in enumerate(examples):
            _check_example(index, example)
            for i, rank_i in enumerate(example.ranks):
                for j, rank_j in enumerate(example.ranks):
                    if rank_i < rank_j:
                        better.append(offset + i)
                        worse.append(offset + j)
            offset += len(example.responses)
        if self.one_row:
            rows = [(e.prompt.tokens, [r.tokens for r in e.responses]) for e in examples]
            layout = _layout(rows, [_shuffled(e, self.seed) for e in examples], self.pad_id)
        else:
            rows = [(e.prompt.tokens, [r.tokens]) for e in examples for r in e.responses]
            layout = _layout(rows, [[0]] * len(rows), self.pad_id)
        batch: Batch = {
            "tokens": layout.tokens,
            "reward_rows": layout.rows,
            "reward_columns": layout.columns,
            "better": torch.tensor(better, dtype=torch.long),
            "worse": torch.tensor(worse, dtype=torch.long),
        }
        if self.one_row:
            batch["segment_ids"] = layout.segment_ids
            batch["document_ids"] = layout.document_ids
        return batch

    def denominators(self, batch: Batch) -> Mapping[str, float]:
        """``{"pairs": the number of ordered pairs in the micro-batch}``."""
        return {"pairs": float(batch["better"].numel())}

    def rewards(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The reward [R] (float32) of every response of `batch`, in `collate`'s order; calls
        ``model(tokens, attention=...)`` (a `RewardModel`, or its DDP wrapper)."""
        tokens = batch["tokens"]
        attention: AttentionBackend
        if self.one_row:
            attention = Segments(
                batch["segment_ids"], document_ids=batch["document_ids"], kernel=self.kernel
            )
        else:
            attention = Causal()
        scores = model(tokens, attention=attention)  # [B, T]
        return scores[batch["reward_rows"], batch["reward_columns"]].float()  # [R]

    def loss_sums(self, model: nn.Module, batch: Batch) -> tuple[LossSums, Metrics]:
        """``{"pairs": Σ -log σ(r_i - r_j)}`` over the ordered pairs, and the metrics."""
        rewards = self.rewards(model, batch)  # [R]
        margins = rewards[batch["better"]] - rewards[batch["worse"]]  # [P]
        loss = -F.logsigmoid(margins).sum()
        with torch.no_grad():
            detached = margins.detach()
            pairs = torch.tensor(float(detached.numel()), device=rewards.device)
            responses = torch.tensor(float(rewards.numel()), device=rewards.device)
            metrics: Metrics = {
                "pair_accuracy": ((detached > 0).float().sum(), pairs),
                "margin": (detached.sum(), pairs),
                "mean_reward": (rewards.detach().sum(), responses),
            }
        return {"pairs": loss}, metrics


# --------------------------------------------------------------------------------------------
# Scoring and evaluation


class RewardScorer:
    """The rewards of K responses to one prompt, for rejection sampling (§4.1.3).

    Responses are packed into as few rows as fit `max_tokens_per_row` (default: the model's
    max_seq_len), the prompt once per row and each response attending to it and to itself only
    (the one-row layout), largest first into the first row with room; a response that fits no
    row with others gets a row of its own. All rows run in one forward pass, under
    `torch.inference_mode`.
    """

    def __init__(
        self,
        model: RewardModel,
        chat_format: ChatFormat,
        *,
        max_tokens_per_row: int | None = None,
        kernel: AttentionKernel = "auto",
    ) -> None:
        """Score with `model`, encoding dialogs with `chat_format` (its tokenizer's pad id pads)."""
        limit = model.config.max_seq_len if max_tokens_per_row is None else max_tokens_per_row
        if limit <= 0:
            raise ValueError(f"max_tokens_per_row must be positive, got {limit}")
        self.model = model
        self.chat_format = chat_format
        self.max_tokens_per_row = limit
        self.kernel: AttentionKernel = kernel

    def __call__(
        self, prompt: Sequence[Message], responses: Sequence[Sequence[Message]]
    ) -> list[float]:
        """The reward of each response to `prompt` (a dialog ending before the assistant's
        turn; each response starts with an assistant message), in the given order."""
        if not responses:
            return []
        prompt_tokens = encode_prompt(self.chat_format, prompt).tokens
        encoded = [encode_response(self.chat_format, prompt, r).tokens for r in responses]
        longest = len(prompt_tokens) + max(len(r) for r in encoded)
        if longest > self.model.config.max_seq_len:
            raise ValueError(
                f"prompt + response is {longest} tokens, beyond the reward model's max_seq_len "
                f"{self.model.config.max_seq_len}; drop or truncate that response"
            )
        groups = self._pack(len(prompt_tokens), [len(r) for r in encoded])
        rows = [(prompt_tokens, [encoded[i] for i in group]) for group in groups]
        layout = _layout(
            rows, [list(range(len(g))) for g in groups], self.chat_format.tokenizer.pad_id
        )
        device = self.model.score.weight.device
        with torch.inference_mode():
            attention = Segments(
                layout.segment_ids.to(device),
                document_ids=layout.document_ids.to(device),
                kernel=self.kernel,
            )
            scores = self.model(layout.tokens.to(device), attention=attention)  # [B, T]
            packed = scores[layout.rows.to(device), layout.columns.to(device)].float().cpu()
        rewards = [0.0] * len(responses)
        for value, index in zip(packed.tolist(), (i for g in groups for i in g), strict=True):
            rewards[index] = value
        return rewards

    def _pack(self, prompt_length: int, lengths: Sequence[int]) -> list[list[int]]:
        """First-fit decreasing: groups of response indices whose row fits the budget."""
        groups: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for g, left in enumerate(room):
                if lengths[index] <= left:
                    groups[g].append(index)
                    room[g] -= lengths[index]
                    break
            else:
                groups.append([index])
                room.append(self.max_tokens_per_row - prompt_length - lengths[index])
        return groups


def pair_accuracy(
    model: RewardModel, examples: Sequence[RankedExample], *, batch_size: int = 8
) -> float:
    """The fraction of ordered pairs (i ranked above j) with r_i > r_j over `examples` (held-out
    evaluation; a tie counts as wrong), in the one-row layout, under `torch.inference_mode`."""
    if not examples:
        raise ValueError("pair_accuracy got no examples")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    objective = RewardObjective()
    device = model.score.weight.device
    correct = total = 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = objective.collate(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            rewards = objective.rewards(model, batch)
            correct += int((rewards[batch["better"]] > rewards[batch["worse"]]).sum())
            total += batch["better"].numel()
    return correct / total


# --------------------------------------------------------------------------------------------
# Hugging Face export


def save_reward_model(
    model: RewardModel, path: str | os.PathLike[str], *, tokenizer: Tokenizer | None = None
) -> Path:
    """Write `model` as a Hugging Face `LlamaForSequenceClassification` directory.

    The backbone is written by `llama_model.save_checkpoint` (weights with Hugging Face names,
    config.json, and with a `tokenizer` the tokenizer files and chat template); the head goes to
    a shard of its own as ``score.weight``, and config.json names the architecture, one label and
    the pad token (`tokenizer.pad_id`, or `<|finetune_right_pad_id|>` for the Llama 3
    vocabulary), so that Hugging Face pools each row's last non-padding token. A sequence
    classifier has no LM head, so there is no ``lm_head.weight`` whether or not the embeddings
    were tied. The whole directory is staged next to `path` and published at once
    (`llama_model.publish_directory`): an existing checkpoint there is replaced only when the new
    one is complete.
    """
    if tokenizer is not None:
        pad_id = tokenizer.pad_id
    elif model.config.vocab_size == _LLAMA3_VOCAB:
        pad_id = _LLAMA3_PAD
    else:
        raise ValueError(
            f"vocab_size {model.config.vocab_size} is not Llama 3's: pass tokenizer= so the "
            "export names its pad token (Hugging Face pools the last non-pad token)"
        )
    target = check_checkpoint_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        save_checkpoint(model.backbone, staging, tokenizer=tokenizer)
        weights = model.backbone.state_dict()
        dtype = next(iter(weights.values())).dtype
        weight_bytes = sum(t.numel() for t in weights.values()) * dtype.itemsize
        score = model.score.weight.detach().to(device="cpu", dtype=dtype)
        _add_score_shard(staging, score, weight_bytes)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        config["architectures"] = ["LlamaForSequenceClassification"]
        config["id2label"] = {"0": "LABEL_0"}  # num_labels = 1, as transformers writes it
        config["label2id"] = {"LABEL_0": 0}
        config["pad_token_id"] = pad_id
        _write_json(staging / "config.json", config)
        (staging / "generation_config.json").unlink(
            missing_ok=True
        )  # a classifier generates nothing
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _add_score_shard(directory: Path, score: torch.Tensor, weight_bytes: int) -> None:
    """Add ``score.weight`` to the safetensors weights of `directory` as one more shard,
    renumbering the shards ``model-0000k-of-0000n`` and writing the index (transformers reads a
    lone model.safetensors before any index, so a single file becomes shard 1 of 2).
    `weight_bytes`: the size of the backbone's tensors (the index's total_size before the head)."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = dict(index["weight_map"])
        total = int(index["metadata"]["total_size"])
    else:
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            names = list(f.keys())  # the header only: no tensor is read
        weight_map = dict.fromkeys(names, "model.safetensors")
        total = weight_bytes
    files = sorted(set(weight_map.values()))
    count = len(files) + 1
    renamed = {old: f"model-{k:05d}-of-{count:05d}.safetensors" for k, old in enumerate(files, 1)}
    for old, new in renamed.items():
        os.replace(directory / old, directory / new)
    last = f"model-{count:05d}-of-{count:05d}.safetensors"
    save_file({_SCORE: score.contiguous()}, directory / last, metadata={"format": "pt"})
    weight_map = {name: renamed[file] for name, file in weight_map.items()}
    weight_map[_SCORE] = last
    _write_json(
        index_path,
        {"metadata": {"total_size": total + score.nbytes}, "weight_map": weight_map},
    )


def _write_json(path: Path, obj: object) -> None:
    """Indented UTF-8 JSON, inside the staging directory (published whole)."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_reward_model(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> RewardModel:
    """Read a Hugging Face `LlamaForSequenceClassification` directory with one label (ours or
    one transformers wrote) into a `RewardModel`; tensors keep the file's dtype unless `dtype`."""
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no config.json: not a checkpoint")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    tensors = read_hf_tensors(directory)
    if _SCORE not in tensors:
        raise ValueError(
            f"{str(directory)!r} has no {_SCORE!r}: not a reward model (for a causal LM, start "
            "one with RewardModel.from_backbone(llama_model.load_checkpoint(path)))"
        )
    labels = tensors[_SCORE].shape[0]
    if labels != 1:
        raise ValueError(
            f"{str(directory)!r} is a classifier with {labels} labels; a reward model has one"
        )
    config = config_from_hf(hf)
    with torch.device("meta"):
        model = RewardModel(Llama(config), nn.Linear(config.dim, 1, bias=False))
    state = {
        (name if name == _SCORE else f"backbone.{from_hf_name(name)}"): tensor
        for name, tensor in tensors.items()
    }
    check_state_dict(model, state, file_name=_hf_name)
    for name in list(state):  # one tensor at a time
        state[name] = state[name].to(device=device, dtype=dtype or state[name].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _hf_name(name: str) -> str:
    """The Hugging Face name of one of `RewardModel`'s parameter names."""
    return name if name == _SCORE else to_hf_name(name.removeprefix("backbone."))
