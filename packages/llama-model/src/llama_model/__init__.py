"""llama_model: the Llama 3 architecture, and the one place in llama3 where it is defined.

Configs and named sizes, the `Llama` module, KV-cached generation, the tiktoken tokenizer, the Llama
3.1 chat format, and checkpoint I/O in the Hugging Face and Meta layouts ("The Llama 3 Herd of
Models", arXiv 2407.21783, §3.2 and Table 3).
"""

from llama_model.atomic import atomic_write, publish_directory
from llama_model.cache import KVCache
from llama_model.chat import ChatFormat, EncodedDialog, Message, ToolCall
from llama_model.checkpoint import load_checkpoint, save_checkpoint
from llama_model.config import PRESETS, LlamaConfig, RopeScaling, count_parameters, flops_per_token
from llama_model.config_errors import format_validation_error
from llama_model.generate import generate, sample
from llama_model.model import Llama, document_positions, init_parameters, initial_parameter
from llama_model.tokenizer import Tokenizer

__all__ = [
    # configuration and sizes
    "PRESETS",
    "LlamaConfig",
    "RopeScaling",
    "count_parameters",
    "flops_per_token",
    "format_validation_error",
    # the model
    "Llama",
    "document_positions",
    "init_parameters",
    "initial_parameter",
    # inference
    "KVCache",
    "generate",
    "sample",
    # text
    "ChatFormat",
    "EncodedDialog",
    "Message",
    "ToolCall",
    "Tokenizer",
    # checkpoints
    "load_checkpoint",
    "save_checkpoint",
    # crash-safe files
    "atomic_write",
    "publish_directory",
]
