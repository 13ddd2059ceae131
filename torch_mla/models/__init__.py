"""Models built on the mla ops: a DeepSeek-V2/V3-style decoder (``deepseek.py``) and its Hugging Face
checkpoint loader (``checkpoint.py``)."""

from .checkpoint import CheckpointError, args_from_hf_config, load_checkpoint, load_tokenizer
from .deepseek import PRESETS, ModelArgs, Transformer

__all__ = ["PRESETS", "ModelArgs", "Transformer", "CheckpointError", "args_from_hf_config", "load_checkpoint",
           "load_tokenizer"]
