import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The tests never touch the network: hub look-ups fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Torch's settings in a process that runs tests. pytest-xdist's controller (pyproject's addopts: -n 2) only
    hands tests out: it imports neither torch nor argonne (this file and tests/launches.py import them where they
    are used), because its workers start only once it has read this file."""
    if (config.getoption("numprocesses", None) and not hasattr(config, "workerinput")
            and not config.getoption("collectonly")):  # --collect-only: this process collects itself
        return
    import torch

    if not torch.cuda.is_available():
        # Triton kernels (decode_kernels.py) run on the CPU under Triton's interpreter, chosen before they load.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # two workers: one thread each, or they fight over the two cores


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_SHARD = REPO / "data" / "sample" / "shard-00000.parquet"
SAMPLE_TOKENIZER = REPO / "data" / "tokenizers" / "sample-bpe-8k"


def write_sample_head(path: Path, documents: int = 200, row_group_size: int = 25) -> Path:
    """The sample's first documents as a parquet file of small row groups: the whole sample is 13 MB of text, and
    tokenizing it costs seconds that a test of a few steps does not need."""
    import pyarrow.parquet as pq

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(SAMPLE_SHARD).slice(0, documents), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def qwen_tokenizer_dir() -> Path:
    path = SHARED_DATA / "qwen2.5-tokenizer"
    if not path.is_dir():
        pytest.skip(f"the Qwen2.5 tokenizer files are not at {path} (they come with the developers' ../shared)")
    return path


@pytest.fixture(autouse=True)
def restore_torch_state():
    """Tests may change the default dtype or seed; put them back."""
    import torch

    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)


def small_model(**overrides):
    """A random tiny-preset model, seeded: 2 layers and a context of 128 unless `overrides` say otherwise (the
    engine's and the server's tests serve it)."""
    import torch

    from argonne import ArgonneConfig, ArgonneForCausalLM

    torch.manual_seed(0)
    settings = {"num_hidden_layers": 2, "max_position_embeddings": 128, "initializer_range": 0.1, **overrides}
    return ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", **settings))


def scramble_norms(model, seed: int = 1):
    """Every norm weight (QK-norm's too) drawn from [0.5, 1.5] instead of ones, so that a norm skipped, misplaced or
    mapped to the wrong tensor changes the logits. Returns the model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


@pytest.fixture
def model_dir(tmp_path):
    """A small random Argonne model saved as a Hugging Face folder, with the sample tokenizer."""
    import torch

    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, initializer_range=0.2)
    ArgonneForCausalLM(config).save_pretrained(tmp_path)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(tmp_path)
    return tmp_path


def break_weights(model):
    """One NaN in layer 0's q_proj and one Inf in the final norm, as a diverged run leaves them. Returns the model."""
    import torch

    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
        model.model.norm.weight[0] = float("inf")
    return model


BROKEN_TENSORS = ("model.layers.0.self_attn.q_proj.weight (1 value)", "model.norm.weight (1 value)")


@pytest.fixture
def nan_model_dir(tmp_path):
    """model_dir's kind of folder, its weights broken by `break_weights`."""
    import torch

    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

    torch.manual_seed(0)
    config = ArgonneConfig.from_preset("tiny", num_hidden_layers=2, initializer_range=0.2)
    folder = tmp_path / "nan-model"
    break_weights(ArgonneForCausalLM(config)).save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture
def overflowing_model_dir(tmp_path):
    """A folder whose weights are finite and whose logits are not: the final norm's weights at float32's largest
    value overflow every logit, as activations overflowing in half precision do. It opens; decoding must refuse."""
    import torch

    from argonne import ArgonneConfig, ArgonneForCausalLM, load_tokenizer

    torch.manual_seed(0)
    model = ArgonneForCausalLM(ArgonneConfig.from_preset("tiny", num_hidden_layers=2, initializer_range=0.2))
    with torch.no_grad():
        model.model.norm.weight.fill_(torch.finfo(torch.float32).max)
    folder = tmp_path / "overflowing-model"
    model.save_pretrained(folder)
    load_tokenizer(SAMPLE_TOKENIZER).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- launching processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    """The environment of a launched process: offline, one thread per process (2 cores here)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def torchrun(nproc: int, *args: str) -> list[str]:
    """A torchrun command line for `nproc` processes on this machine, each rank's lines prefixed (--tee 3)."""
    return [sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), *args]


# torchrun --tee 3 prefixes each worker's lines with [defaultN]:, and its error report with [rankN]:.
RANK_LINE = re.compile(r"^\[(?:default|rank)(\d+)\]:")


def failure(*outputs: str) -> str:
    """What to show for a failed launch: the last lines of every rank (a rank that aborts is often not rank 0),
    then the end of what torchrun itself printed (in one process: the end of the output)."""
    lines = "\n".join(outputs).splitlines()
    by_rank: dict[int, list[str]] = {}
    for line in lines:
        if match := RANK_LINE.match(line):
            by_rank.setdefault(int(match.group(1)), []).append(line)
    ranks = [f"--- rank {rank} ---\n" + "\n".join(own[-40:]) for rank, own in sorted(by_rank.items())]
    launcher = [line for line in lines if not RANK_LINE.match(line)]
    return "\n".join(ranks) + "\n--- launcher ---\n" + "\n".join(launcher[-30:])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from `ps`."""
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(table[::2], table[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_process(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout the launcher and every process below it are killed
    (torchrun's workers too: killing the launcher alone once left workers running), and the test fails with what
    it printed."""
    process = subprocess.Popen(args, env=kwargs.pop("env", None) or env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill the launcher's whole tree, found before the
        # launcher dies (its orphans would be re-parented and lost).
        for pid in [*descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = process.communicate()
        raise AssertionError(f"{' '.join(args[:6])} ... timed out after {timeout} s\n" + failure(out, err)) from None
    return subprocess.CompletedProcess(args, process.returncode, out, err)


# The shared training runs and launches (session-wide: built once per test process, i.e. per pytest-xdist worker).
from .launches import (  # noqa: E402,F401 - registered here as fixtures
    eval_one_process,
    eval_tasks,
    float8_one_process,
    four_processes,
    muon_one_process,
    one_process,
    prepared_sample,
    streamed_one_process,
    streaming,
    two_processes,
)


def pytest_collection_modifyitems(items):
    """pytest-xdist (pyproject's addopts: -n 2 --dist loadfile) runs each module on one worker, so that its module
    fixtures are built once, and hands the modules out in this order: test_distributed.py first, whose shared
    launches take longest, so that the other worker has the rest to fill that time with."""
    items.sort(key=lambda item: item.path.name != "test_distributed.py")
