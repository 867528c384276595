"""Device names -> checked torch devices, for training and for loading models."""

import pytest
import torch

from argonne import ArgonneConfig
from argonne_cli import main
from argonne.device import DeviceError, resolve_device
from argonne.loading import open_model

from .conftest import REPO


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_a_gpu_and_cpu_is_always_there(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_cuda_without_a_gpu_says_so_and_what_to_use(no_gpu):
    with pytest.raises(DeviceError, match=r"device 'cuda' asked for, but no CUDA GPU is available.*use cpu, or auto"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "meta"])
def test_names_torch_does_not_know_or_we_do_not_run_on_are_errors(name):
    with pytest.raises(DeviceError, match=f"{name!r}.*use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_takes_the_local_rank_and_is_checked_against_the_gpu_count(two_gpus):
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"needs GPU 2 \(LOCAL_RANK 2\), but this machine has 2 GPU\(s\)"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(DeviceError, match="needs GPU 5, but this machine has 2"):
        resolve_device("cuda:5")


def test_train_on_a_missing_gpu_is_a_message_not_a_traceback(no_gpu, tmp_path, capsys):
    code = main(["train", str(REPO / "configs" / "tiny.toml"), f"--train.run_dir={str(tmp_path)!r}",
                 "--train.device=cuda"])
    assert code == 2
    assert "argonne train: error: device 'cuda' asked for, but no CUDA GPU is available" in capsys.readouterr().err


def test_open_model_checks_the_device(no_gpu, tmp_path, capsys):
    ArgonneConfig.from_preset("tiny", num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        open_model(tmp_path, "gpu")
    assert main(["generate", str(tmp_path), "--prompt", "x", "--device", "cuda"]) == 2
    assert "argonne generate: error: device 'cuda' asked for, but no CUDA GPU" in capsys.readouterr().err
