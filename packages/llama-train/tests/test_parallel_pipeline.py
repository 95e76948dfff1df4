"""Pipeline parallelism: the stage split (names, layers, errors) on one process, and the three
schedules against a single process's loss and gradients (gloo processes)."""

from __future__ import annotations

from collections.abc import Callable
from subprocess import CompletedProcess

import pytest
import torch
from oracle import language_model_loss

from llama_model import Documents, Llama, LlamaConfig
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.parallel.pipeline import (
    check_layers_per_stage,
    check_schedule,
    default_layers_per_stage,
    pipeline_loss,
    split_llama,
    stage_indices,
)

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


def tiny_config(n_layers: int = 6, *, tied: bool = False) -> LlamaConfig:
    return LlamaConfig.model_validate(
        {
            "dim": 32, "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
            "multiple_of": 16, "max_seq_len": 32, "tie_word_embeddings": tied,
        }
    )  # fmt: skip


def tiny_model(config: LlamaConfig) -> Llama:
    model = Llama(config)
    model.init_weights(seed=0, std=0.1)
    return model


def packed_batch(config: LlamaConfig, batch: int = 4, seq_len: int = 12) -> Batch:
    """Rows of 2-3 packed documents; the targets crossing into the next document are ignored."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g)
    doc_ids = torch.zeros(batch, seq_len + 1, dtype=torch.long)
    for row in range(batch):
        for cut in torch.randint(2, seq_len, (2,), generator=g).tolist()[: 1 + row % 2]:
            doc_ids[row, cut:] += 1
    targets = tokens[:, 1:].clone()
    targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE_INDEX
    return Batch(tokens=tokens[:, :-1], targets=targets, document_ids=doc_ids[:, :-1])


def test_default_split_gives_leftover_layers_to_interior_stages_first() -> None:
    """An even split; leftovers go to interior stages, then the first, never before the last."""
    assert default_layers_per_stage(8, 4) == [2, 2, 2, 2]
    assert default_layers_per_stage(10, 4) == [2, 3, 3, 2]
    assert default_layers_per_stage(8, 3) == [3, 3, 2]
    assert default_layers_per_stage(5, 2) == [3, 2]
    assert default_layers_per_stage(3, 1) == [3]
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        default_layers_per_stage(3, 4)


def test_layers_per_stage_errors_name_the_values() -> None:
    """Wrong total, wrong length, negative counts and empty interior stages are refused by value."""
    assert check_layers_per_stage([1, 2, 2, 1], 6, 4) == [1, 2, 2, 1]
    assert check_layers_per_stage([0, 6], 6, 2) == [0, 6]  # the ends may be empty
    with pytest.raises(ValueError, match=r"\[1, 2, 2\] sums to 5 but the model has n_layers=6"):
        check_layers_per_stage([1, 2, 2], 6, 3)
    with pytest.raises(ValueError, match=r"\[3, 3\] has 2 entries but there are 4 stages"):
        check_layers_per_stage([3, 3], 6, 4)
    with pytest.raises(ValueError, match="non-negative"):
        check_layers_per_stage([-1, 7], 6, 2)
    with pytest.raises(ValueError, match=r"interior stage\(s\) \[1\] without layers"):
        check_layers_per_stage([3, 0, 3], 6, 3)


def test_virtual_stages_loop_over_ranks() -> None:
    """Stage s runs on rank s % pp (the placement of PyTorch's interleaved schedules)."""
    assert stage_indices(0, 2, 2) == [0, 2]
    assert stage_indices(1, 2, 2) == [1, 3]
    assert stage_indices(3, 4, 1) == [3]
    with pytest.raises(ValueError, match=r"pp_rank 2 is outside \[0, 2\)"):
        stage_indices(2, 2)


def test_stages_keep_the_full_models_parameter_names_once_each() -> None:
    """Each parameter is on exactly one stage, under its full-model name and with its value; the
    embedding is only on the first stage, the final norm and output only on the last."""
    model = tiny_model(tiny_config(6))
    per_rank = [
        split_llama(
            model, pp_rank=rank, pp_size=2, stages_per_rank=2, layers_per_stage=[1, 2, 2, 1]
        )
        for rank in range(2)
    ]
    layer_ids = [[tuple(int(key) for key in s.layers) for s in stages] for stages in per_rank]
    assert layer_ids == [[(0,), (3, 4)], [(1, 2), (5,)]]  # stage s runs on rank s % 2
    stages = [per_rank[0][0], per_rank[1][0], per_rank[0][1], per_rank[1][1]]  # stage order
    names = [dict(s.named_parameters()) for s in stages]
    assert "tok_embeddings.weight" in names[0] and "layers.0.attention.wq.weight" in names[0]
    assert set(names[0]) - {"tok_embeddings.weight"} == {
        n for n, _ in model.named_parameters() if n.startswith("layers.0.")
    }
    assert {n.split(".")[1] for n in names[2]} == {"3", "4"}
    assert {"norm.weight", "output.weight", "layers.5.feed_forward.w2.weight"} <= set(names[3])
    assert not any(n.startswith(("tok_embeddings", "norm", "output")) for n in names[1] | names[2])
    full = dict(model.named_parameters())
    merged = [n for stage_names in names for n in stage_names]
    assert sorted(merged) == sorted(full)  # each exactly once
    for stage_names in names:
        for name, param in stage_names.items():
            assert torch.equal(param, full[name]) and param is not full[name]  # copies


def test_stages_in_sequence_equal_the_model_and_micro_batch_grads_sum_to_the_batch_grad() -> None:
    """Chaining the stages reproduces the model's logits on packed documents, and the
    micro-batch losses (sum over targets / the whole batch's count) add up to the batch's mean
    loss with the same gradients, names matched one to one."""
    model = tiny_model(tiny_config(6))
    batch = packed_batch(model.config)
    expected_loss = language_model_loss(model, batch)
    expected_loss.backward()  # type: ignore[no-untyped-call]
    expected = {n: p.grad for n, p in model.named_parameters()}
    stages = split_llama(model, pp_rank=0, pp_size=1, stages_per_rank=3)  # 3 stages on one rank
    count = (batch.targets != IGNORE_INDEX).sum()
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches
        h = batch.tokens[rows]
        for stage in stages:
            h = stage(h, attention=Documents(batch.document_ids[rows]))
        loss = pipeline_loss(h, batch.targets[rows], num_targets=count)
        loss.backward()  # type: ignore[no-untyped-call]
        total += loss.detach()
    torch.testing.assert_close(total, expected_loss.detach(), atol=1e-6, rtol=1e-6)
    grads = {n: p.grad for s in stages for n, p in s.named_parameters()}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_without_an_attention_backend_a_stage_is_plain_causal() -> None:
    """No backend: one stage holding everything equals `model(tokens)`."""
    model = tiny_model(tiny_config(2))
    (stage,) = split_llama(model, pp_rank=0, pp_size=1)
    tokens = packed_batch(model.config).tokens
    torch.testing.assert_close(stage(tokens), model(tokens), atol=1e-6, rtol=1e-5)


def test_tied_embeddings_split_only_into_one_stage() -> None:
    """Tied embeddings are refused for several stages, and work as one stage."""
    model = tiny_model(tiny_config(2, tied=True))
    with pytest.raises(ValueError, match="tie_word_embeddings=True cannot be pipelined"):
        split_llama(model, pp_rank=0, pp_size=2)
    (stage,) = split_llama(model, pp_rank=0, pp_size=1)
    assert "output.weight" not in dict(stage.named_parameters())
    batch = packed_batch(model.config)
    expected = model(batch.tokens, attention=Documents(batch.document_ids))
    got = stage(batch.tokens, attention=Documents(batch.document_ids))
    assert not torch.allclose(got, stage(batch.tokens))  # the documents' mask matters here
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_meta_model_splits_without_memory() -> None:
    """A model built on the meta device splits into meta stages that can then be materialised."""
    with torch.device("meta"):
        model = Llama(tiny_config(4))
    (stage,) = split_llama(model, pp_rank=1, pp_size=2)
    assert all(p.device.type == "meta" for p in stage.parameters())
    stage.to_empty(device="cpu")
    assert sorted(n for n, _ in stage.named_parameters())[-2:] == ["norm.weight", "output.weight"]


def test_schedule_constraints_are_checked_by_name() -> None:
    """Unknown names, virtual stages on a single-stage schedule, too few micro-batches for 1F1B
    and micro-batch counts interleaved 1F1B cannot round are refused with the values."""
    assert check_schedule("GPipe", n_microbatches=1, pp_size=4, stages_per_rank=1) == "GPipe"
    assert check_schedule("Interleaved1F1B", n_microbatches=3, pp_size=4, stages_per_rank=2)
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'ZB'; choose one of"):
        check_schedule("ZB", n_microbatches=4, pp_size=2, stages_per_rank=1)
    with pytest.raises(ValueError, match="'1F1B' runs one stage per rank, got stages_per_rank=2"):
        check_schedule("1F1B", n_microbatches=4, pp_size=2, stages_per_rank=2)
    with pytest.raises(ValueError, match="n_microbatches=2 for 4 stages"):
        check_schedule("1F1B", n_microbatches=2, pp_size=4, stages_per_rank=1)
    with pytest.raises(ValueError, match=r"multiple of max\(1, n_microbatches // pp\) = 2"):
        check_schedule("Interleaved1F1B", n_microbatches=5, pp_size=2, stages_per_rank=2)
    with pytest.raises(ValueError, match="n_microbatches must be >= 1"):
        check_schedule("GPipe", n_microbatches=0, pp_size=2, stages_per_rank=1)


@pytest.mark.distributed
def test_schedules_match_one_process(run_distributed: RunDistributed) -> None:
    """1F1B, GPipe and interleaved 1F1B (2 stages per rank), even and uneven layers (including an
    embedding-only first stage), with and without FSDP over a 1-rank dp mesh, on 2 pipeline
    ranks: the loss and every parameter's gradient equal one process's on the same batch."""
    cases = [
        "1F1B,1,4,even,0",
        "1F1B,1,2,1-3,1",
        "GPipe,1,4,0-4,0",
        "Interleaved1F1B,2,8,1-2-2-1,0",
        "Interleaved1F1B,2,4,even,1",
    ]
    out = run_distributed("check_pipeline.py", 2, "--pp", "2", *cases).stdout
    assert all(f"ok {case}:" in out for case in cases) and "OK pipeline" in out


@pytest.mark.distributed
def test_schedules_with_fsdp_data_parallel_match_one_process(
    run_distributed: RunDistributed,
) -> None:
    """pp=2 × dp_shard=2 (each stage module and block `fully_shard`ed, half the batch per dp rank):
    the loss and gradients equal one process's on the whole batch."""
    cases = ["1F1B,1,2,even,1", "Interleaved1F1B,2,2,1-2-2-1,1", "GPipe,1,2,3-1,1"]
    out = run_distributed("check_pipeline.py", 4, "--pp", "2", *cases).stdout
    assert all(f"ok {case}:" in out for case in cases) and "OK pipeline" in out


def _stage_chain_vs_model(device: str, monkeypatch: pytest.MonkeyPatch, *, backward: bool) -> None:
    # head_dim 16: the least compiled FlexAttention takes
    model = tiny_model(tiny_config(4).model_copy(update={"dim": 64})).to(device)
    batch = packed_batch(model.config)
    tokens, ids = batch.tokens.to(device), batch.document_ids.to(device)
    stages = split_llama(model, pp_rank=0, pp_size=1, stages_per_rank=2)
    import llama_model.attention as attention_module

    calls: list[int] = []
    flex = attention_module._flex_attention

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return flex(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention_module, "_flex_attention", counted)
    with torch.set_grad_enabled(backward):
        expected = model(tokens, attention=Documents(ids, kernel="flex"))
        attention = Documents(ids, kernel="flex")
        got = stages[1](stages[0](tokens, attention=attention), attention=attention)
    assert len(calls) == 2 * model.config.n_layers  # the model's layers, then the stages' layers
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if backward:
        expected.square().mean().backward()  # type: ignore[no-untyped-call]
        got.square().mean().backward()  # type: ignore[no-untyped-call]
        for stage in stages:
            for name, param in stage.named_parameters():
                reference = model.get_parameter(name).grad
                torch.testing.assert_close(param.grad, reference, atol=1e-4, rtol=1e-3, msg=name)


# On CPU FlexAttention runs its eager reference, which warns that it is unfused: expected here.
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile:UserWarning")
def test_stages_use_the_models_flex_document_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FlexAttention (the CUDA default) chained stages give the model's logits (CPU: forward
    only, FlexAttention has no CPU backward)."""
    _stage_chain_vs_model("cpu", monkeypatch, backward=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # dynamo
def test_stages_use_the_models_flex_document_mask_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the stages' FlexAttention gives the model's logits and gradients."""
    torch.backends.cuda.matmul.allow_tf32 = False
    _stage_chain_vs_model("cuda", monkeypatch, backward=True)
