"""Tests of the reward model (§4.1.2): one row per prompt equals one row per response, the ranking
loss equals TRL 1.16's `RewardTrainer`, the export loads in transformers with the same scores, and
training on a separable task raises pair accuracy. Oracles: separate unpadded causal rows,
transformers' `LlamaForSequenceClassification`, TRL's `compute_loss`. All in float32."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from llama_align.data import (
    PreferenceRow,
    RankedExample,
    encode_prompt,
    encode_ranked,
    encode_response,
)
from llama_align.reward import (
    RewardModel,
    RewardObjective,
    RewardScorer,
    load_reward_model,
    pair_accuracy,
    save_reward_model,
)
from llama_model import (
    ChatFormat,
    Llama,
    LlamaConfig,
    Message,
    Segments,
    Tokenizer,
    save_checkpoint,
)

ATOL = 1e-5  # float32: the same sums in another order / another kernel


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def chat(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def tiny_reward_model(seed: int = 0) -> RewardModel:
    config = LlamaConfig.model_validate(
        {
            "dim": 64,
            "n_layers": 2,
            "n_heads": 2,
            "n_kv_heads": 1,
            "multiple_of": 32,
            "max_seq_len": 512,
            "rope_scaling": None,
        }
    )
    backbone = Llama(config)
    backbone.init_weights(seed=seed)
    return RewardModel.from_backbone(backbone, seed=seed)


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return tiny_reward_model()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


ROWS = [
    {  # edited > chosen > rejected: three responses, three ordered pairs
        "prompt": user("What does os.path.join do?"),
        "edited": assistant("It joins path components with the separator of the platform."),
        "chosen": assistant("It joins paths."),
        "rejected": assistant("It splits a path into its directory and its file name, and more."),
    },
    {  # a shorter prompt with a system message; ranks with a tie (1, 1): two pairs
        "prompt": [{"role": "system", "content": "Be brief."}, *user("Name a prime.")],
        "responses": [
            {"messages": assistant("7"), "rank": 0},
            {"messages": assistant("Nine, I think."), "rank": 1},
            {"messages": assistant("Eight."), "rank": 1},
        ],
    },
]


@pytest.fixture(scope="module")
def examples(chat: ChatFormat) -> list[RankedExample]:
    rows = [PreferenceRow.model_validate(row) for row in ROWS]
    return encode_ranked(chat, rows, max_tokens=512)


def alone(model: RewardModel, prompt: list[int], response: list[int]) -> float:
    """The oracle: prompt + response as one unpadded causal row, the score at its last token."""
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        return float(model(tokens)[0, -1])


def test_one_row_equals_separate_rows(model: RewardModel, examples: list[RankedExample]) -> None:
    """Prompt + 3 shuffled responses in one padded row score as each response alone (1e-5)."""
    one_row = RewardObjective(one_row=True)
    batch = one_row.collate(examples)
    assert batch["tokens"].shape[0] == 2  # two examples, one row each, the shorter one padded
    lengths = [len(e.prompt) + sum(len(r) for r in e.responses) for e in examples]
    assert lengths[0] != lengths[1]
    with torch.no_grad():
        rewards = one_row.rewards(model, batch)
        separate = RewardObjective(one_row=False)
        baseline = separate.rewards(model, separate.collate(examples))
        scores = model(batch["tokens"], attention=_segments(batch))
    expected = torch.tensor(
        [alone(model, e.prompt.tokens, r.tokens) for e in examples for r in e.responses]
    )
    torch.testing.assert_close(rewards, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(baseline, expected, atol=ATOL, rtol=0)
    assert torch.isfinite(scores).all()  # padding included: no NaN anywhere
    # The responses were laid out shuffled: some row does not hold them in the given order.
    orders = [_row_order(batch, b, len(e.responses)) for b, e in enumerate(examples)]
    assert any(order != sorted(order) for order in orders)


def _segments(batch: dict[str, Any]) -> Segments:
    return Segments(batch["segment_ids"], document_ids=batch["document_ids"])


def _row_order(batch: dict[str, Any], row: int, count: int) -> list[int]:
    """The given index of each response of `row`, in the order they appear in it."""
    mask = batch["reward_rows"] == row
    columns = batch["reward_columns"][mask].tolist()
    return sorted(range(count), key=lambda i: columns[i])


def test_shuffle_is_seeded_by_the_example(examples: list[RankedExample]) -> None:
    """The layout depends only on the seed and the example, not on the batch it is in."""
    first, second = examples
    objective = RewardObjective(seed=3)
    alone_batch = objective.collate([second])
    together = objective.collate([first, second])
    assert _row_order(alone_batch, 0, 3) == _row_order(together, 1, 3)
    layouts = {tuple(_row_order(RewardObjective(seed=s).collate([first]), 0, 3)) for s in range(12)}
    assert len(layouts) > 1  # other seeds, other orders


def test_pairs_and_denominators(model: RewardModel, examples: list[RankedExample]) -> None:
    """Every ordered pair i above j is one term; ties make none; the float64 sum agrees."""
    objective = RewardObjective()
    batch = objective.collate(examples)
    assert objective.denominators(batch) == {"pairs": 5.0}  # 3 + 2 (the tie makes no pair)
    sums, metrics = objective.loss_sums(model, batch)
    with torch.no_grad():
        r = objective.rewards(model, batch).double()
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5)]
    expected = sum(-torch.nn.functional.logsigmoid(r[i] - r[j]) for i, j in pairs)
    torch.testing.assert_close(sums["pairs"].double(), expected, atol=ATOL, rtol=0)
    correct = sum(float(r[i] > r[j]) for i, j in pairs)
    assert float(metrics["pair_accuracy"][0]) == correct
    assert float(metrics["pair_accuracy"][1]) == 5.0
    assert float(metrics["mean_reward"][1]) == 6.0


@pytest.fixture(scope="module")
def exported(model: RewardModel, tokenizer: Tokenizer, tmp_path_factory: Any) -> Path:
    return save_reward_model(model, tmp_path_factory.mktemp("rm") / "reward", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def hf_model(exported: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        exported, dtype=torch.float32, attn_implementation="eager"
    )
    return hf.eval()


def test_export_loads_in_transformers_with_same_scores(
    model: RewardModel, chat: ChatFormat, exported: Path, hf_model: Any
) -> None:
    """transformers loads the export as a 1-label LlamaForSequenceClassification; its padded
    per-dialog scores equal `RewardScorer`'s one-row scores (1e-5)."""
    assert type(hf_model).__name__ == "LlamaForSequenceClassification"
    assert hf_model.config.num_labels == 1
    config = json.loads((exported / "config.json").read_text())
    assert config["pad_token_id"] == chat.tokenizer.pad_id
    assert not (exported / "generation_config.json").exists()
    prompt = [Message(role="user", content="Which sort is stable in Python?")]
    responses = [
        [Message(role="assistant", content=text)]
        for text in ("sorted() and list.sort() are stable.", "None.", "heapq, by default.")
    ]
    ours = RewardScorer(model, chat)(prompt, responses)
    prompt_tokens = encode_prompt(chat, prompt).tokens
    rows = [prompt_tokens + encode_response(chat, prompt, r).tokens for r in responses]
    width = max(map(len, rows))
    pad = chat.tokenizer.pad_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention_mask = (input_ids != pad).long()
    with torch.no_grad():
        theirs = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    torch.testing.assert_close(torch.tensor(ours), theirs, atol=ATOL, rtol=0)


def test_load_reward_model_round_trips(model: RewardModel, exported: Path) -> None:
    """`load_reward_model` reads the export back with every tensor bit for bit."""
    loaded = load_reward_model(exported)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert loaded.backbone.output is None
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["score.weight"] == "model-00002-of-00002.safetensors"
    assert not (exported / "model.safetensors").exists()  # else transformers skips the index


def test_export_replaces_a_checkpoint_whole(model: RewardModel, tmp_path: Path) -> None:
    """A second save replaces the first and leaves no staging directories beside it."""
    target = tmp_path / "rm"
    save_reward_model(model, target)
    other = tiny_reward_model(seed=1)
    save_reward_model(other, target)
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]
    assert torch.equal(load_reward_model(target).score.weight, other.score.weight)


def test_load_refuses_a_causal_lm(tmp_path: Path) -> None:
    """A causal-LM directory is not a reward model: the error says how to start one."""
    config = LlamaConfig.model_validate(
        {"dim": 64, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 256}
    )
    llama = Llama(config)
    llama.init_weights(seed=0)
    save_checkpoint(llama, tmp_path / "lm")
    with pytest.raises(ValueError, match=r"no 'score.weight'.*from_backbone"):
        load_reward_model(tmp_path / "lm")


def test_loss_equals_trl_reward_trainer(
    model: RewardModel, examples: list[RankedExample], exported: Path, hf_model: Any
) -> None:
    """Our pairwise loss (mean over pairs) equals TRL 1.16 `RewardTrainer.compute_loss` on the
    exported classifier, fed every ordered pair as a (chosen, rejected) row; accuracy and margin
    agree too."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    objective = RewardObjective()
    batch = objective.collate(examples)
    sums, metrics = objective.loss_sums(model, batch)
    ours = sums["pairs"] / objective.denominators(batch)["pairs"]

    chosen, rejected = [], []
    for e in examples:
        for i, rank_i in enumerate(e.ranks):
            for j, rank_j in enumerate(e.ranks):
                if rank_i < rank_j:
                    chosen.append(e.prompt.tokens + e.responses[i].tokens)
                    rejected.append(e.prompt.tokens + e.responses[j].tokens)
    dataset = datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    args = trl.RewardConfig(
        output_dir=str(exported.parent / "trl"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(chosen),
        center_rewards_coefficient=None,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    trainer = trl.RewardTrainer(
        model=hf_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    inputs = trainer.data_collator(list(trainer.train_dataset))  # TRL's own collator
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(ours.detach(), theirs, atol=ATOL, rtol=0)
    logged = trainer._metrics["eval"]  # the model is in eval mode (it has no dropout anyway)
    accuracy = float(metrics["pair_accuracy"][0] / metrics["pair_accuracy"][1])
    margin = float(metrics["margin"][0] / metrics["margin"][1])
    assert accuracy == pytest.approx(logged["accuracy"][-1], abs=1e-6)
    assert margin == pytest.approx(logged["margin"][-1], abs=ATOL)


def test_every_parameter_gets_a_gradient(examples: list[RankedExample]) -> None:
    """One backward reaches the head and every backbone weight (DDP needs no unused
    parameters; the LM head is gone), with finite values."""
    model = tiny_reward_model()
    objective = RewardObjective()
    sums, _ = objective.loss_sums(model, objective.collate(examples))
    torch.autograd.backward(sums["pairs"])
    assert all(name != "backbone.output.weight" for name, _ in model.named_parameters())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def _toy_examples(chat: ChatFormat, count: int, seed: int) -> list[RankedExample]:
    """A separable task: the better answer names a fruit, the worse one a metal."""
    rng = random.Random(seed)
    fruits = ["apple", "pear", "plum", "cherry", "mango", "lemon", "grape", "peach"]
    metals = ["iron", "zinc", "lead", "tin", "copper", "nickel", "cobalt", "silver"]
    topics = ["lunch", "a gift", "the garden", "a painting", "a song", "a story", "a trip"]
    rows = []
    for _ in range(count):
        topic = rng.choice(topics)
        rows.append(
            PreferenceRow.model_validate(
                {
                    "prompt": user(f"Name one thing for {topic}."),
                    "chosen": assistant(f"Maybe {rng.choice(fruits)}."),
                    "rejected": assistant(f"Maybe {rng.choice(metals)}."),
                }
            )
        )
    return encode_ranked(chat, rows, max_tokens=512)


def test_training_raises_pair_accuracy(chat: ChatFormat) -> None:
    """Eight AdamW steps on a separable task raise held-out pair accuracy from below chance
    (0.31 with this seed) to (nearly) all pairs, and lower the loss."""
    model = tiny_reward_model(seed=1)
    train, held_out = _toy_examples(chat, 32, seed=0), _toy_examples(chat, 32, seed=1)
    before = pair_accuracy(model, held_out)
    objective = RewardObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(8):  # two passes over the training set
        chunk = train[(step * 8) % 32 : (step * 8) % 32 + 8]
        batch = objective.collate(chunk)
        sums, _ = objective.loss_sums(model, batch)
        loss = sums["pairs"] / objective.denominators(batch)["pairs"]
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    after = pair_accuracy(model, held_out)
    assert before < 0.5
    assert after >= 0.95
    assert sum(losses[4:]) < sum(losses[:4])


def _replace(example: RankedExample, **changes: Any) -> RankedExample:
    return dataclasses.replace(example, **changes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: _replace(e, responses=e.responses[:1], ranks=(0,)), "1 response"),
        (lambda e: _replace(e, ranks=(1, 1, 1)), "has rank 1: no pair"),
        (lambda e: _replace(e, ranks=(0, 1)), "but 2 ranks"),
        (
            lambda e: _replace(
                e,
                responses=(
                    e.responses[0],
                    dataclasses.replace(
                        e.responses[1],
                        tokens=e.responses[1].tokens[:-1],
                        assistant_mask=e.responses[1].assistant_mask[:-1],
                        format_mask=e.responses[1].format_mask[:-1],
                    ),
                    e.responses[2],
                ),
            ),
            "response 1 of example 1 does not end with its terminator",
        ),
    ],
)
def test_bad_examples_are_refused(examples: list[RankedExample], change: Any, message: str) -> None:
    """An example the ranking loss cannot use is refused, naming the example and the fix."""
    bad = change(examples[0])
    with pytest.raises(ValueError, match=message):
        RewardObjective().collate([examples[1], bad])


def test_scorer_packs_rows_within_budget(model: RewardModel, chat: ChatFormat) -> None:
    """A row budget that fits two responses per row gives the same rewards, in order, as one
    row holding all five; an oversized dialog is refused."""
    prompt = [Message(role="user", content="Say hi.")]
    responses = [[Message(role="assistant", content="hi " * n)] for n in (1, 5, 2, 9, 3)]
    whole = RewardScorer(model, chat)(prompt, responses)
    prompt_length = len(encode_prompt(chat, prompt))
    budget = prompt_length + 2 * len(encode_response(chat, prompt, responses[3]))
    packed = RewardScorer(model, chat, max_tokens_per_row=budget)(prompt, responses)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(whole), atol=ATOL, rtol=0)
    expected = [
        alone(model, encode_prompt(chat, prompt).tokens, encode_response(chat, prompt, r).tokens)
        for r in responses
    ]
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(expected), atol=ATOL, rtol=0)
    assert RewardScorer(model, chat)(prompt, []) == []
    with pytest.raises(ValueError, match="beyond the reward model's max_seq_len 512"):
        RewardScorer(model, chat)(prompt, [[Message(role="assistant", content="hi " * 600)]])
