"""llama_model: the Llama 3 architecture, and the one place in llama3 where it is defined.

Configs and named sizes, the `Llama` module and its attention seam (the caller says which keys each
query sees: causal, packed documents, segments, a mask, a KV cache, or its own backend),
KV-cached generation, the tiktoken tokenizer, the Llama 3.1 chat format and its tool prompt,
checkpoint I/O in the Hugging Face and Meta layouts ("The Llama 3 Herd of Models", arXiv
2407.21783, §3.2 and Table 3), and the crash-safe file writes every package with torch uses.
"""

from llama_model.atomic import atomic_write, publish_directory
from llama_model.attention import (
    AttentionBackend,
    AttentionKernel,
    CachedAttention,
    Causal,
    Documents,
    ExplicitMask,
    Segments,
)
from llama_model.cache import KVCache, KVCacheProtocol
from llama_model.chat import ChatFormat, EncodedDialog, Message, ToolCall
from llama_model.checkpoint import (
    check_checkpoint_target,
    check_state_dict,
    config_from_hf,
    config_to_hf,
    from_hf_name,
    load_checkpoint,
    read_hf_tensors,
    save_checkpoint,
    to_hf_name,
)
from llama_model.config import PRESETS, LlamaConfig, RopeScaling, count_parameters, flops_per_token
from llama_model.config_errors import format_validation_error
from llama_model.config_files import load_config
from llama_model.generate import decode_one_token, generate
from llama_model.initialization import init_parameters
from llama_model.masks import document_positions
from llama_model.model import Llama
from llama_model.tokenizer import Tokenizer
from llama_model.tool_prompt import LLAMA31_BUILTIN_TOOLS, with_tool_prompt

__all__ = [
    # configuration and sizes
    "PRESETS",
    "LlamaConfig",
    "RopeScaling",
    "count_parameters",
    "flops_per_token",
    "format_validation_error",
    "load_config",
    # the model
    "Llama",
    "document_positions",
    "init_parameters",
    # the attention seam: which keys each query sees (model(tokens, attention=...))
    "AttentionBackend",
    "AttentionKernel",
    "Causal",
    "Documents",
    "Segments",
    "ExplicitMask",
    "CachedAttention",
    # inference
    "KVCache",
    "KVCacheProtocol",
    "decode_one_token",
    "generate",
    # text
    "ChatFormat",
    "EncodedDialog",
    "Message",
    "ToolCall",
    "Tokenizer",
    # tool calling (the Llama 3.1 tool prompt)
    "LLAMA31_BUILTIN_TOOLS",
    "with_tool_prompt",
    # checkpoints
    "load_checkpoint",
    "save_checkpoint",
    # the Hugging Face layout's names and config.json (for other checkpoint formats)
    "config_from_hf",
    "config_to_hf",
    "to_hf_name",
    "from_hf_name",
    "read_hf_tensors",
    "check_state_dict",
    "check_checkpoint_target",
    # crash-safe files
    "atomic_write",
    "publish_directory",
]
