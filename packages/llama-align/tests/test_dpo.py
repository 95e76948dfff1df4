"""DPO (§4.1.4) against TRL 1.16's DPOTrainer, the paper's formatting mask, reference options.

The oracle is TRL's `DPOTrainer._compute_loss` (through `compute_loss`) with
``DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1)`` on a transformers
`LlamaForCausalLM` holding the same weights as our `Llama` (written by `save_checkpoint`, read by
transformers), and TRL's own reference model (loaded by TRL from that directory). Float32 all
through. Tolerance 1e-5 relative (the loss; each gradient tensor against its largest entry):
the two sides compute the same math with different kernels (TRL's chunked fused LM head and
transformers' SDPA attention against our logsumexp-gather and attention; the logits themselves
are bit-identical), so they agree to float32 rounding, measured at 3e-7 (loss) and 2e-6
(gradients); one token more or less in a mask, or another normalisation, moves the loss by 1e-3 or
more.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llama_align.data import PreferenceExample, PreferenceRow, encode_preference
from llama_align.dpo import (
    DPO_BETA,
    DPO_NLL_WEIGHT,
    DpoMask,
    DpoObjective,
    PreferenceWithReference,
    preference_accuracy,
    reference_logprobs,
    sequence_logprobs,
    with_reference,
)
from llama_align.policy import Policy
from llama_model import ChatFormat, Llama, LlamaConfig, Tokenizer, save_checkpoint, to_hf_name

CONFIG = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=512, rope_scaling=None
)
RTOL = 1e-5  # see the module docstring

PAIRS: list[dict[str, Any]] = [
    {
        "prompt": [
            {"role": "system", "content": "You answer geography questions."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris is the capital of France."}],
        "rejected": [{"role": "assistant", "content": "I believe it is Lyon."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "Another one, larger?"},
        ],
        "chosen": [{"role": "assistant", "content": "Eleven is prime."}],
        "rejected": [{"role": "assistant", "content": "Nine, which is odd and therefore prime."}],
    },
    {  # a response of three messages: a tool call, the tool's result, the answer
        "prompt": [{"role": "user", "content": "What's the weather in Paris?"}],
        "chosen": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "brave_search",
                            "arguments": {"query": "weather in Paris"},
                        },
                    }
                ],
                "end_of_message": True,
            },
            {"role": "tool", "content": "Sunny, 21 C"},
            {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
        ],
        "rejected": [{"role": "assistant", "content": "I cannot know that."}],
    },
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def chat(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def examples(chat: ChatFormat) -> list[PreferenceExample]:
    rows = [PreferenceRow.model_validate(p) for p in PAIRS]
    out = encode_preference(chat, rows, max_tokens=512)
    assert len(out) == len(PAIRS)
    return out


def _perturb(model: nn.Module, seed: int, scale: float = 0.02) -> list[tuple[str, torch.Tensor]]:
    """Add seeded noise to each parameter of `model`; return it by (our) parameter name."""
    generator = torch.Generator().manual_seed(seed)
    noises = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise)
            noises.append((name, noise))
    return noises


class Parity:
    """Our policy and reference, and a TRL DPOTrainer on the same weights."""

    def __init__(self, directory: Path, tokenizer: Tokenizer) -> None:
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

        from llama_align.trl_collator import PaperPreferenceCollator

        reference = Llama(CONFIG)
        reference.init_weights(seed=0)
        save_checkpoint(reference, directory / "model", tokenizer=tokenizer)
        hf_policy = transformers.LlamaForCausalLM.from_pretrained(
            directory / "model", dtype=torch.float32
        )
        policy = copy.deepcopy(reference)
        # Move the policy away from the reference, identically on both sides, so that the log-ratios
        # are not zero.
        with torch.no_grad():
            for name, noise in _perturb(policy, seed=1):
                hf_policy.get_parameter(to_hf_name(name)).add_(noise)
        self.policy = Policy(policy)  # what the objectives run
        self.reference = Policy(reference.requires_grad_(False))
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "model")
        self.pad_token_id = int(tokenizer.pad_id)  # <|finetune_right_pad_id|>
        hf_tokenizer.pad_token = "<|finetune_right_pad_id|>"
        args = DPOConfig(
            output_dir=str(directory / "trl"),
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, DPO_NLL_WEIGHT],
            beta=DPO_BETA,
            report_to=[],
            use_cpu=True,
            bf16=False,  # TRL's default is True: the reference would run under bf16 autocast
            disable_tqdm=True,
        )
        self.collator = PaperPreferenceCollator(pad_token_id=self.pad_token_id, tokenizer=tokenizer)
        # No ref_model: TRL loads its reference from the policy's directory (the unperturbed
        # weights), as a user of DPOTrainer gets it.
        self.trainer: Any = DPOTrainer(
            model=hf_policy,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=hf_tokenizer,
            data_collator=self.collator,
        )

    def trl_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        model = self.trainer.model
        model.zero_grad(set_to_none=True)
        loss = self.trainer.compute_loss(model, batch)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        return float(loss.detach()), grads


def _trl_examples(examples: Sequence[PreferenceExample]) -> list[dict[str, list[int]]]:
    return [
        {
            "prompt_ids": e.prompt.tokens,
            "chosen_ids": e.chosen.tokens,
            "rejected_ids": e.rejected.tokens,
        }
        for e in examples
    ]


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Parity:
    return Parity(tmp_path_factory.mktemp("dpo"), tokenizer)


def _our_loss(
    objective: DpoObjective, policy: nn.Module, examples: Sequence[Any]
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    batch = objective.collate(examples)
    denominators = objective.denominators(batch)
    sums, metrics = objective.loss_sums(policy, batch)
    return sum(sums[k] / denominators[k] for k in sums), metrics  # type: ignore[return-value]


def _our_loss_and_grads(
    policy: nn.Module, reference: Any, examples: Sequence[Any], mask: DpoMask
) -> tuple[float, dict[str, torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    loss, _ = _our_loss(DpoObjective(reference, mask=mask), policy, examples)
    loss.backward()
    grads = {
        name.removeprefix("llama."): p.grad.detach().clone()
        for name, p in policy.named_parameters()
    }  # our parameter names (Policy holds the Llama as .llama)
    return float(loss.detach()), grads


def _assert_same(
    ours: tuple[float, dict[str, torch.Tensor]], theirs: tuple[float, dict[str, torch.Tensor]]
) -> None:
    (our_loss, our_grads), (trl_loss, trl_grads) = ours, theirs
    assert our_loss == pytest.approx(trl_loss, rel=RTOL)
    assert {to_hf_name(name) for name in our_grads} == set(trl_grads)
    for name, grad in our_grads.items():
        expected = trl_grads[to_hf_name(name)]
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, expected, rtol=0, atol=RTOL * scale, msg=name)


def test_sequence_logprobs_match_float64_log_softmax() -> None:
    """Summed masked log-probs equal a float64 log_softmax oracle, and padding is never read."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    tokens = torch.randint(0, 11, (3, 6), generator=generator)
    mask = torch.tensor(
        [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool
    )
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1].gather(2, tokens[:, 1:, None])[..., 0]
    expected = (logp * mask[:, 1:]).sum(1)
    got = sequence_logprobs(logits, tokens, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    logits[0, 4:] = float("nan")  # row 0's positions 4, 5 predict nothing scored
    assert torch.isfinite(sequence_logprobs(logits, tokens, mask)[0])


def test_trl_tokenizes_the_rows_as_our_chat_format(
    parity: Parity, examples: list[PreferenceExample]
) -> None:
    """TRL's tokenization of the JSONL rows (HF chat template) gives our prompt/response ids."""
    for prepared, example in zip(parity.trainer.train_dataset, examples, strict=True):
        assert prepared["prompt_ids"] == example.prompt.tokens
        assert prepared["chosen_ids"] == example.chosen.tokens
        assert prepared["rejected_ids"] == example.rejected.tokens


def test_completion_mask_equals_trl(parity: Parity, examples: list[PreferenceExample]) -> None:
    """With TRL's completion mask, loss and every gradient equal TRL's sigmoid+0.2·sft DPO."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=parity.pad_token_id)(_trl_examples(examples))
    theirs = parity.trl_loss(batch)
    ours = _our_loss_and_grads(parity.policy, parity.reference, examples, "completion")
    _assert_same(ours, theirs)


def test_paper_mask_equals_trl_with_paper_collator(
    parity: Parity, examples: list[PreferenceExample]
) -> None:
    """With PaperPreferenceCollator in TRL's trainer and mask="paper" here: same loss, gradients."""
    assert parity.trainer.data_collator is parity.collator  # the trainer kept our collator
    batch = parity.trainer.data_collator(_trl_examples(examples))
    theirs = parity.trl_loss(batch)
    ours = _our_loss_and_grads(parity.policy, parity.reference, examples, "paper")
    _assert_same(ours, theirs)
    with torch.no_grad():
        objective = DpoObjective(parity.reference, mask="completion")
        completion, _ = _our_loss(objective, parity.policy, examples)
    assert abs(float(completion) - ours[0]) > 1e-3  # the two masks give different losses


def test_metrics_equal_trl(parity: Parity, examples: list[PreferenceExample]) -> None:
    """Log-probs, implicit rewards, margins and accuracy equal TRL's logged metrics."""
    trainer = parity.trainer
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, trainer.data_collator(_trl_examples(examples)))
        _, metrics = _our_loss(DpoObjective(parity.reference), parity.policy, examples)
    logged = trainer._metrics[mode]
    for name in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
                 "rewards/margins", "rewards/accuracies"):  # fmt: skip
        total, count = metrics[name]
        assert float(total / count) == pytest.approx(logged[name][-1], rel=RTOL, abs=1e-6), name
    assert 0 < float(metrics["rewards/accuracies"][0]) < len(examples)  # not a trivial 0 or 1


@pytest.mark.parametrize(
    ("max_length", "truncation_mode"), [(None, "keep_start"), (30, "keep_start"), (30, "keep_end")]
)
def test_paper_collator_mask_is_dpo_mask(
    examples: list[PreferenceExample], max_length: int | None, truncation_mode: str
) -> None:
    """PaperPreferenceCollator's completion mask is ChatFormat's dpo_mask, also when truncated."""
    from llama_align.trl_collator import PaperPreferenceCollator

    collator = PaperPreferenceCollator(
        pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode
    )
    batch = collator(_trl_examples(examples))
    responses = [e.chosen for e in examples] + [e.rejected for e in examples]
    prompts = [e.prompt for e in examples] * 2
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        expected = [False] * len(prompt) + response.dpo_mask
        if max_length is not None:
            cut = (
                slice(None, max_length)
                if truncation_mode == "keep_start"
                else slice(-max_length, None)
            )
            expected = expected[cut]
        got = batch["completion_mask"][row].tolist()
        assert got == [int(m) for m in expected] + [0] * (len(got) - len(expected)), row


def test_paper_collator_pickles() -> None:
    """The collator survives pickling (DataLoader workers under spawn) and keeps its ids."""
    from llama_align.trl_collator import PaperPreferenceCollator

    collator = PaperPreferenceCollator(pad_token_id=0)
    example = {"prompt_ids": [128000, 128006, 78191, 128007, 271], "chosen_ids": [9906, 128009],
               "rejected_ids": [2822, 128009]}  # fmt: skip
    again = pickle.loads(pickle.dumps(collator))
    assert again([example])["completion_mask"].tolist() == [[0] * 5 + [1, 0]] * 2


def test_masks_differ_exactly_on_headers_terminators_and_tool_output(
    examples: list[PreferenceExample], tokenizer: Tokenizer
) -> None:
    """TRL's mask minus the paper's is the header and terminator tokens (and a tool's output)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from llama_align.trl_collator import PaperPreferenceCollator

    batch = _trl_examples(examples)
    trl_mask = DataCollatorForPreference(pad_token_id=0)(batch)["completion_mask"]
    paper_mask = PaperPreferenceCollator(pad_token_id=0)(batch)["completion_mask"]
    assert bool((paper_mask <= trl_mask).all())
    ids = DataCollatorForPreference(pad_token_id=0)(batch)["input_ids"]

    def removed(row: int) -> str:
        return tokenizer.decode(ids[row][(trl_mask[row] == 1) & (paper_mask[row] == 0)].tolist())

    # a one-message response: only its terminator
    assert removed(0) == "<|eot_id|>"
    # assistant (tool call, <|eom_id|>), tool result, assistant: both headers, all three
    # terminators, and the tool's output, which the assistant did not write
    assert removed(2) == (
        "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\nSunny, 21 C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
    )
    kept = tokenizer.decode(ids[2][paper_mask[2] == 1].tolist())
    assert kept == 'brave_search.call(query="weather in Paris")It is sunny and 21 C in Paris.'


def test_gradients_do_not_depend_on_the_split(
    parity: Parity, examples: list[PreferenceExample]
) -> None:
    """Loss sums over micro-batches, divided by global denominators, give one batch's gradients."""
    objective = DpoObjective(parity.reference)
    policy = parity.policy
    whole = _our_loss_and_grads(policy, parity.reference, examples, "paper")
    parts = [objective.collate(examples[:1]), objective.collate(examples[1:])]
    totals = {k: sum(objective.denominators(b)[k] for b in parts) for k in ("pairs", "tokens")}
    policy.zero_grad(set_to_none=True)
    loss = 0.0
    for batch in parts:
        sums, _ = objective.loss_sums(policy, batch)
        part = sum(sums[k] / totals[k] for k in sums)
        part.backward()  # type: ignore[union-attr]
        loss += float(part.detach())  # type: ignore[union-attr]
    assert loss == pytest.approx(whole[0], rel=1e-6)
    for name, parameter in policy.named_parameters():
        assert parameter.grad is not None
        expected = whole[1][name.removeprefix("llama.")]
        scale = float(expected.abs().max())
        torch.testing.assert_close(parameter.grad, expected, rtol=0, atol=1e-6 * scale)


def test_precomputed_reference_equals_frozen_model(
    parity: Parity, examples: list[PreferenceExample]
) -> None:
    """Reference log-probs computed once and carried by the examples give the same loss."""
    logprobs = reference_logprobs(parity.reference, examples, batch_size=2)
    carried = with_reference(examples, logprobs)
    frozen, _ = _our_loss(DpoObjective(parity.reference), parity.policy, examples)
    precomputed, _ = _our_loss(DpoObjective("precomputed"), parity.policy, carried)
    assert float(precomputed.detach()) == pytest.approx(float(frozen.detach()), rel=1e-6)


def test_adapters_off_reference_is_the_base_model() -> None:
    """With a LoRA policy, reference="adapters-off" equals a frozen copy of the base model."""
    from peft import LoraConfig, get_peft_model

    tokenizer = Tokenizer.llama3()
    chat = ChatFormat(tokenizer)
    rows = [PreferenceRow.model_validate(p) for p in PAIRS[:2]]
    examples = encode_preference(chat, rows, max_tokens=512)
    base = Llama(CONFIG)
    base.init_weights(seed=0)
    frozen = copy.deepcopy(base).requires_grad_(False)
    lora = LoraConfig(r=4, target_modules=["wq", "wv", "w2"], init_lora_weights=False)
    policy = Policy(get_peft_model(base, lora))
    adapters_off, metrics = _our_loss(DpoObjective("adapters-off"), policy, examples)
    explicit, _ = _our_loss(DpoObjective(Policy(frozen)), policy, examples)
    assert float(adapters_off.detach()) == pytest.approx(float(explicit.detach()), rel=1e-6)
    assert float(metrics["rewards/margins"][0]) != 0.0  # the adapters are back on for the policy
    adapters_off.backward()
    trained = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


def test_dpo_raises_held_out_preference_accuracy(chat: ChatFormat) -> None:
    """A few DPO steps make the held-out implicit reward prefer the chosen answers."""
    topics = ["rivers", "bread", "stars", "chess", "tea", "maps", "owls", "glass", "salt", "moss"]

    def pair(topic: str) -> PreferenceRow:
        return PreferenceRow.model_validate(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
                "chosen": [
                    {"role": "assistant", "content": f"Gladly! Here is a fact about {topic}."}
                ],
                "rejected": [
                    {"role": "assistant", "content": f"No. Ask someone else about {topic}."}
                ],
            }
        )

    train = encode_preference(chat, [pair(t) for t in topics[:6]], max_tokens=512)
    held_out = encode_preference(chat, [pair(t) for t in topics[6:]], max_tokens=512)
    llama = Llama(CONFIG)
    llama.init_weights(seed=0)
    policy, reference = Policy(llama), Policy(copy.deepcopy(llama).requires_grad_(False))
    assert preference_accuracy(policy, reference, held_out) == (0.0, 0.0)  # ties before training
    objective = DpoObjective(reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = _our_loss(objective, policy, train)
        loss.backward()
        optimizer.step()
    accuracy, margin = preference_accuracy(policy, reference, held_out)
    assert accuracy == 1.0
    assert margin > 0.5


def test_bad_inputs_say_what_is_wrong(
    examples: list[PreferenceExample], chat: ChatFormat, tokenizer: Tokenizer
) -> None:
    """Wrong settings and unusable examples raise errors that name the value and the fix."""
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="mask must be one of 'paper', 'completion'; got 'all'"):
        DpoObjective(model, mask="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta must be positive"):
        DpoObjective(model, beta=0.0)
    with pytest.raises(ValueError, match=r"reference must be an nn\.Module"):
        DpoObjective("base")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"at least one preference example"):
        DpoObjective(model).collate([])
    with pytest.raises(TypeError, match=r"example 0 .* without reference log-probs"):
        DpoObjective("precomputed").collate(examples[:1])
    carried = with_reference(examples[:1], [(-1.0, -2.0)], mask="completion")
    with pytest.raises(ValueError, match=r"mask='completion'.*mask='paper'"):
        DpoObjective("precomputed").collate(carried)
    with pytest.raises(TypeError, match="reference='precomputed' to use them"):
        DpoObjective(model).collate(carried)
    with pytest.raises(ValueError, match="3 examples but 1 reference log-prob pairs"):
        with_reference(examples, [(0.0, 0.0)])
    empty = PreferenceRow.model_validate(
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant",
         "content": ""}], "rejected": [{"role": "assistant", "content": "no"}]}
    )  # fmt: skip
    with pytest.raises(ValueError, match="example 0: the chosen response has no token"):
        DpoObjective(model).collate(encode_preference(chat, [empty], max_tokens=64))
    batch = DpoObjective("adapters-off").collate(examples[:1])
    with pytest.raises(TypeError, match="needs a PEFT model"):
        DpoObjective("adapters-off").loss_sums(Policy(Llama(CONFIG)), batch)
    assert isinstance(carried[0], PreferenceWithReference)
