"""Argonne: an open LLM pretraining stack in PyTorch.

Importing the package registers the model with transformers' Auto classes, so `AutoConfig` and
`AutoModelForCausalLM` resolve model_type "argonne" without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_argonne import PRESETS, ArgonneConfig
from .modeling_argonne import ArgonneForCausalLM
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["PRESETS", "ArgonneConfig", "ArgonneForCausalLM", "load_tokenizer", "__version__"]

AutoConfig.register("argonne", ArgonneConfig, exist_ok=True)
AutoModelForCausalLM.register(ArgonneConfig, ArgonneForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies configuration_argonne.py / modeling_argonne.py (and loss_argonne.py,
# which the model file imports relatively) beside the weights, so the folder also loads with trust_remote_code=True
# where Argonne is not installed.
ArgonneConfig.register_for_auto_class()
ArgonneForCausalLM.register_for_auto_class("AutoModelForCausalLM")
