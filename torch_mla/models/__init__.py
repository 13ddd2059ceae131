"""Models built on the mla ops: a DeepSeek-V2/V3-style decoder (``deepseek.py``)."""

from .deepseek import PRESETS, ModelArgs, Transformer, args_from_hf_config, load_checkpoint

__all__ = ["PRESETS", "ModelArgs", "Transformer", "args_from_hf_config", "load_checkpoint"]
