"""Single-device model code (torch only): the Llama decoder and its presets."""

from lmforge.model.llama import Llama, LlamaConfig, flops_per_token, num_params
from lmforge.model.presets import PRESETS, model_config

__all__ = ["PRESETS", "Llama", "LlamaConfig", "flops_per_token", "model_config", "num_params"]
