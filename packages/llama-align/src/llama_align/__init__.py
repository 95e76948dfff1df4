"""llama_align: post-training Llama 3 models (§4 of "The Llama 3 Herd of Models", arXiv 2407.21783).

The paper's recipe, round after round: a reward model on ranked responses, one row per prompt
with every response attending to the prompt and itself only (§4.1.2); rejection sampling of K
answers per prompt through `llama_serve`'s engine, the prompt's KV cache shared (§4.1.3); SFT on
the assistant tokens of packed dialogs (§4.1.3); DPO with the formatting tokens masked and an NLL
term of 0.2 (§4.1.4); and the weight-by-weight average of models (§4.1.5). On any Hugging Face
Llama directory, with LoRA through PEFT, data parallelism through accelerate, TRL's conventions for
data, and `PaperPreferenceCollator` (`llama_align.trl_collator`, extra ``llama-align[trl]``) to put
the paper's DPO mask into TRL's own `DPOTrainer`. `llama-align sft|rm|sample|dpo|average|round`
is its command line.
"""

from llama_align.averaging import average_hf_checkpoints
from llama_align.config import (
    AverageConfig,
    DpoConfig,
    DpoSettings,
    RewardConfig,
    RewardSettings,
    RoundConfig,
    SampleConfig,
    SftConfig,
    SftSettings,
)
from llama_align.data import (
    DataError,
    DataReport,
    PreferenceExample,
    PreferenceRow,
    PromptRow,
    RankedExample,
    RankedResponse,
    SftExample,
    SftRow,
    encode_preference,
    encode_prompt,
    encode_ranked,
    encode_response,
    encode_sft,
    read_rows,
    write_rows,
)
from llama_align.dpo import (
    DpoObjective,
    PreferenceWithReference,
    preference_accuracy,
    reference_logprobs,
    with_reference,
)
from llama_align.lora import LoraSettings, add_lora, merge_lora
from llama_align.objective import Objective
from llama_align.policy import Policy
from llama_align.reward import (
    RewardModel,
    RewardObjective,
    RewardScorer,
    load_reward_model,
    pair_accuracy,
    save_reward_model,
)
from llama_align.sampling import (
    EngineSampler,
    Sampler,
    SamplingReport,
    SamplingResult,
    SamplingSettings,
    Scorer,
    rejection_sample,
)
from llama_align.sft import PackedRow, SftObjective, pack_dialogs
from llama_align.stages import (
    run_average,
    run_dpo,
    run_rm,
    run_round,
    run_sample,
    run_sft,
    stage_done,
)
from llama_align.tasks import DocstringTask, TaskSplits
from llama_align.trainer import AlignTrainer, TrainResult, TrainSettings
from llama_align.vllm_sampler import VllmSampler

__all__ = [
    # data: JSONL rows in TRL's conventions, validated, and their encodings
    "SftRow",
    "PreferenceRow",
    "RankedResponse",
    "PromptRow",
    "DataReport",
    "DataError",
    "read_rows",
    "write_rows",
    "encode_prompt",
    "encode_response",
    "SftExample",
    "RankedExample",
    "PreferenceExample",
    "encode_sft",
    "encode_ranked",
    "encode_preference",
    # the training loop and what it trains
    "AlignTrainer",
    "TrainSettings",
    "TrainResult",
    "Objective",
    "Policy",
    # SFT (§4.1.3)
    "PackedRow",
    "pack_dialogs",
    "SftObjective",
    # the reward model (§4.1.2)
    "RewardModel",
    "RewardObjective",
    "RewardScorer",
    "pair_accuracy",
    "save_reward_model",
    "load_reward_model",
    # rejection sampling (§4.1.3)
    "SamplingSettings",
    "Scorer",
    "Sampler",
    "EngineSampler",
    "VllmSampler",
    "SamplingReport",
    "SamplingResult",
    "rejection_sample",
    # DPO (§4.1.4)
    "DpoObjective",
    "PreferenceWithReference",
    "reference_logprobs",
    "with_reference",
    "preference_accuracy",
    # LoRA (PEFT) and model averaging (§4.1.5)
    "LoraSettings",
    "add_lora",
    "merge_lora",
    "average_hf_checkpoints",
    # stages and rounds (`llama-align`)
    "SftSettings",
    "RewardSettings",
    "DpoSettings",
    "SftConfig",
    "RewardConfig",
    "DpoConfig",
    "SampleConfig",
    "AverageConfig",
    "RoundConfig",
    "run_sft",
    "run_rm",
    "run_sample",
    "run_dpo",
    "run_average",
    "run_round",
    "stage_done",
    # a verifiable task from real text (stdlib docstrings)
    "DocstringTask",
    "TaskSplits",
]
