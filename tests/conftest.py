import os
from pathlib import Path

import pytest
import torch

# The tests never touch the network: hub look-ups fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels (decode_kernels.py) run on the CPU under Triton's interpreter; it must be chosen before they load.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_SHARD = REPO / "data" / "sample" / "shard-00000.parquet"
SAMPLE_TOKENIZER = REPO / "data" / "tokenizers" / "sample-bpe-8k"


@pytest.fixture
def qwen_tokenizer_dir() -> Path:
    path = SHARED_DATA / "qwen2.5-tokenizer"
    if not path.is_dir():
        pytest.skip(f"the Qwen2.5 tokenizer files are not at {path} (they come with the developers' ../shared)")
    return path


@pytest.fixture(autouse=True)
def restore_torch_state():
    """Tests may change the default dtype or seed; put them back."""
    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)
