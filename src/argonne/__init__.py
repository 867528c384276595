"""Argonne: an open LLM pretraining stack in PyTorch.

Importing the package registers the model with transformers' Auto classes, so `AutoConfig` and
`AutoModelForCausalLM` resolve model_type "argonne" without remote code.
"""

import logging


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


# transformers imports torchao whenever it is installed (argonne[float8], the tests), and torchao's import logs that
# its optional compiled kernels (MX formats, CUTLASS) do not load on this machine, and torch that torchao registers
# enums it no longer needs to: noise on every command, about kernels FP8 training does not use.
logging.getLogger("torchao").addFilter(_DropMessages("Failed to load "))
logging.getLogger("torch.utils._pytree").addFilter(_DropMessages("is an Enum subclass and is now natively supported"))

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .configuration_argonne import PRESETS, ArgonneConfig  # noqa: E402
from .modeling_argonne import ArgonneForCausalLM  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PRESETS", "ArgonneConfig", "ArgonneForCausalLM", "load_tokenizer", "__version__"]

AutoConfig.register("argonne", ArgonneConfig, exist_ok=True)
AutoModelForCausalLM.register(ArgonneConfig, ArgonneForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies configuration_argonne.py / modeling_argonne.py (and loss_argonne.py,
# which the model file imports relatively) beside the weights, so the folder also loads with trust_remote_code=True
# where Argonne is not installed.
ArgonneConfig.register_for_auto_class()
ArgonneForCausalLM.register_for_auto_class("AutoModelForCausalLM")
