"""Where training runs (trainer/common/device.py): device resolution, the distributed plan,
and the batch builders that put what they build on a given device."""

from __future__ import annotations

import pytest
import torch

from trainer.common.device import (
    CPU_BF16_MIN_PARAMETERS,
    autocast,
    autocast_dtype,
    distributed_plan,
    folding_pays,
    resolve_device,
)
from trainer.ppo.config import PPOConfig
from trainer.ppo.models import TokenBatch
from trainer.ppo.trainer import _padded
from trainer.reward.config import RewardConfig


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda", 0)
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    # Under torchrun each rank takes its own GPU.
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda", cuda_available=True) == torch.device("cuda", 3)
    assert resolve_device("auto", cuda_available=True, local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("gpu")


def test_auto_resolves_to_what_this_machine_has():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_precision_and_folding_policy_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(cpu) is None and autocast_dtype(cuda) is torch.bfloat16
    assert folding_pays(cpu) and not folding_pays(cuda)
    x = torch.ones(2, 3)
    with autocast(cpu, None):  # the CPU policy: float32 products
        assert (x @ x.T).dtype == torch.float32
    with autocast(cpu, torch.bfloat16):  # what CUDA's policy does, on the CPU
        assert (x @ x.T).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("precision", "on_cpu", "on_cuda"),
    [
        ("auto", None, torch.bfloat16),
        ("bfloat16", torch.bfloat16, torch.bfloat16),
        ("float32", None, None),
    ],
)
def test_a_configs_precision_overrides_the_devices_policy(precision, on_cpu, on_cuda):
    assert autocast_dtype(torch.device("cpu"), precision) is on_cpu
    assert autocast_dtype(torch.device("cuda", 0), precision) is on_cuda


def test_auto_on_the_cpu_takes_bfloat16_for_large_models_where_the_cpu_multiplies_it(
    monkeypatch: pytest.MonkeyPatch,
):
    from trainer.common import device

    cpu, big, small = torch.device("cpu"), CPU_BF16_MIN_PARAMETERS, CPU_BF16_MIN_PARAMETERS - 1
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: True)
    assert autocast_dtype(cpu, "auto", big) is torch.bfloat16
    assert autocast_dtype(cpu, "auto", small) is None
    assert autocast_dtype(cpu, "auto", None) is None  # size unknown: float32
    assert autocast_dtype(cpu, "float32", big) is None
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: False)  # emulated: slower
    assert autocast_dtype(cpu, "auto", big) is None
    assert autocast_dtype(cpu, "bfloat16", small) is torch.bfloat16  # asked for: given


def test_bfloat16_asked_for_on_a_cpu_that_emulates_it_is_given_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from trainer.common import device

    device._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: True)
    with caplog.at_level("WARNING", logger=device.__name__):
        autocast_dtype(torch.device("cpu"), "bfloat16")
        assert not caplog.records  # native products: nothing to say
        monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: False)
        autocast_dtype(torch.device("cpu"), "auto", CPU_BF16_MIN_PARAMETERS)
        assert not caplog.records  # auto takes float32 there: nothing emulated
        for _ in range(2):
            assert autocast_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16
        assert autocast_dtype(torch.device("cuda", 0), "bfloat16") is torch.bfloat16
    assert [r.getMessage().count("emulated") for r in caplog.records] == [1]  # once
    device._warn_emulated_bf16.cache_clear()


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be"):
        autocast_dtype(torch.device("cpu"), "float16")
    with pytest.raises(ValueError, match=r"PPOConfig.precision must be one of"):
        PPOConfig(precision="fp16")


@pytest.mark.parametrize(
    ("cuda", "world", "local_rank", "expected"),
    [
        (False, 1, 0, (None, None)),
        (True, 1, 0, (None, None)),
        (False, 2, 1, ("gloo", None)),
        (True, 2, 1, ("nccl", [1])),
        (True, 8, 5, ("nccl", [5])),
    ],
)
def test_distributed_backend_follows_where_the_tensors_are(cuda, world, local_rank, expected):
    assert distributed_plan(cuda, world, local_rank) == expected


def test_the_device_is_a_documented_field_of_both_training_configs():
    for config in (PPOConfig(), RewardConfig()):
        assert config.device == "auto"
        assert "bfloat16" in type(config).__dataclass_fields__["device"].metadata["help"]
    assert PPOConfig(device="cuda").fingerprint() != PPOConfig().fingerprint()
    with pytest.raises(ValueError, match=r"RewardConfig.device must be one of"):
        RewardConfig(device="gpu")


def test_batch_builders_put_what_they_build_on_the_device_asked_for():
    """The meta device stands in for a GPU: a builder that ignored its device argument
    would leave the tensors on the CPU."""
    batch = TokenBatch.build([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0, device="meta")
    tensors = (batch.input_ids, batch.attention_mask, batch.positions)
    tensors += (batch.response_ids, batch.mask)
    assert batch.device.type == "meta"
    assert all(t.device.type == "meta" for t in tensors)
    assert [t.shape for t in tensors] == [(2, 5), (2, 5), (2, 3), (2, 3), (2, 3)]
    on_cpu = TokenBatch.build([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0)
    assert on_cpu.to("cpu") is on_cpu  # already there: no copy
    assert on_cpu.to("meta").mask.device.type == "meta"
    padded = _padded([[0.5], [0.1, 0.2]], 3, torch.device("meta"))
    assert padded.device.type == "meta" and padded.shape == (2, 3)
    expected = torch.tensor([[0.5, 0, 0], [0.1, 0.2, 0]])
    assert torch.equal(_padded([[0.5], [0.1, 0.2]], 3), expected)
