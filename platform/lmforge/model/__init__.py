"""Model code and artifact I/O: the Llama decoder (single-device, torch only) and its presets,
LoRA, generation, the chat format and special tokens, the artifact files (artifact.py,
version.py), Hugging Face import/export (hf.py), the model registry (registry.py) and the
`models` / `export` / `import` commands (command.py)."""

from lmforge.model.llama import Llama, LlamaConfig, flops_per_token, num_params
from lmforge.model.presets import PRESETS, model_config

__all__ = ["PRESETS", "Llama", "LlamaConfig", "flops_per_token", "model_config", "num_params"]
