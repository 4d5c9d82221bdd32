"""The trainer on its device (trainer/common/device.py) with the real demo model: the frozen
reference is the base model bit for bit under bfloat16 autocast, every tensor of a PPO
iteration is on the models' device, and a data-parallel step runs on each rank's device
(gloo on CPU, NCCL on GPUs).

The tests marked ``gpu`` skip without CUDA (tests/conftest.py); benchmarks/gpu_check.py runs
them on a GPU machine. The bfloat16 claims are also checked here on the CPU: bfloat16
autocast works there too, so the exactness of the reference does not wait for a GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.fixtures.distributed import ddp_step, free_port
from tests.fixtures.ppo import CONCISE, SMALL_PPO, flat_reward_model
from trainer.common.device import autocast
from trainer.demo.corpus import sample_prompts
from trainer.ppo.core import logprobs_from_logits
from trainer.ppo.models import PolicyModels, TokenBatch, _gather_positions
from trainer.ppo.rollout.base import render_prompts
from trainer.ppo.rollout.hf import HFSampler
from trainer.ppo.trainer import PPOTrainer, ScoredRollout
from trainer.reward.model import load_base_model
from trainer.reward.rules import ComposedReward, build_rules

PROMPTS = [[{"role": "user", "content": p.text}] for p in sample_prompts(5, 16)]


@pytest.fixture(scope="module")
def reward_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reward")
    flat_reward_model(demo_model_dir).save(out)
    return out


def _base_logprobs(base, batch: TokenBatch, device: torch.device, dtype) -> torch.Tensor:
    """The plain ``transformers`` model (no PEFT anywhere): hidden states, the LM head on
    the response positions, log-probs, under the same autocast policy."""
    with torch.no_grad(), autocast(device, dtype):
        hidden = base.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        logits = base.lm_head(_gather_positions(hidden, batch.positions)[batch.mask.bool()])
    return batch.unpack(logprobs_from_logits(logits.float(), batch.response_tokens(), 1.0))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["cpu", "cuda"]
)
def test_the_reference_is_the_base_bit_for_bit_under_bf16_autocast(
    demo_model_dir: Path, reward_dir: Path, device: str
):
    """The reference (every adapter disabled) under the CUDA precision policy, bfloat16
    autocast over float32 weights, equals the plain base model's log-probs exactly, after
    the trained-looking actor ran folded or active on the same weights."""
    where = torch.device(device)
    # CUDA's policy, also on the CPU (a config's precision: bfloat16)
    models = PolicyModels.load(demo_model_dir, reward_dir, seed=1).to(where, "bfloat16")
    assert models.autocast_dtype is torch.bfloat16
    assert models.reward.autocast_dtype is torch.bfloat16  # its reward model's passes too
    with torch.no_grad():  # a policy adapter that changes the answers, as after training
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], 0, where)
    with torch.no_grad():
        actor, _ = models.actor_critic.actor(batch)
        reference = models.reference_logprobs(batch)
    base, _ = load_base_model(demo_model_dir)
    base.to(where)
    assert reference.device.type == where.type
    assert torch.equal(reference, _base_logprobs(base, batch, where, torch.bfloat16))
    assert not torch.equal(actor, reference)  # the adapter is really off in the reference
    # ... and the comparison really ran in bfloat16: float32 gives other numbers (and is
    # exact too).
    models.autocast_dtype = None
    with torch.no_grad():
        fp32_reference = models.reference_logprobs(batch)
    assert not torch.equal(fp32_reference, reference)
    assert torch.equal(fp32_reference, _base_logprobs(base, batch, where, None))


@pytest.mark.gpu
def test_a_ppo_iteration_keeps_every_tensor_on_the_gpu(demo_model_dir: Path, reward_dir: Path):
    """One iteration on CUDA: every batch the passes see, every tensor of the scored
    rollout, every parameter and optimizer state are on the GPU, and the numbers are
    finite."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    models = PolicyModels.load(demo_model_dir, reward_dir).to(cuda)
    seen: list[torch.device] = []
    hidden_states = models.hidden_states

    def spy(batch: TokenBatch) -> torch.Tensor:
        seen.extend(t.device for t in (batch.input_ids, batch.attention_mask, batch.mask))
        return hidden_states(batch)

    models.hidden_states = spy  # type: ignore[method-assign]  # a spy on the instance
    reward_fn = ComposedReward(models.reward, build_rules(CONCISE)).components
    trainer = PPOTrainer(SMALL_PPO, models, HFSampler(models), reward_fn)
    rollouts: list[ScoredRollout] = []
    score = trainer._rollout_and_score
    trainer._rollout_and_score = lambda *a: rollouts.append(score(*a)) or rollouts[-1]  # type: ignore[method-assign]
    metrics = trainer.iteration(PROMPTS, 0)
    assert seen and {d.type for d in seen} == {"cuda"}
    (rollout,) = rollouts
    tensors = [rollout.old_logprobs, rollout.values, rollout.ref_logprobs]
    tensors += [rollout.sampler_logprobs, rollout.batch.input_ids, *rollout.reward_parts.values()]
    assert {t.device.type for t in tensors} == {"cuda"}
    assert {p.device.type for p in models.trainable_parameters()} == {"cuda"}
    states = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert {t.dtype for t in states if t.dim() > 0} == {torch.float32}  # float32 masters
    assert {t.device.type for t in states if t.dim() > 0} == {"cuda"}
    assert all(p.dtype == torch.float32 for p in models.peft_model.parameters())
    assert torch.isfinite(torch.tensor([metrics["reward_raw"], metrics["kl_ref"]])).all()
    assert metrics["gradient_steps"] >= 1  # an optimizer step ran on the GPU
    saved = models.policy_state()
    assert {t.device.type for t in saved.values()} == {"cpu"}  # what vLLM loads


def test_a_bfloat16_iteration_on_the_cpu_runs_folded_and_keeps_float32_masters(
    demo_model_dir: Path, reward_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """``precision: bfloat16`` on the CPU: the update's LoRA layers run the folded path in
    bfloat16 (not PEFT's per-call weight casts); the first iteration recomputes the
    decode's log-probs (bfloat16 decode and full passes differ in rounding) and the next
    one takes them only because that gap was under the tolerance; the weights, gradients
    and optimizer state stay float32 while the adapter moves."""
    from trainer.common import lora_folding

    models = PolicyModels.load(demo_model_dir, reward_dir, seed=1).to(
        torch.device("cpu"), "bfloat16"
    )
    dtypes: list[torch.dtype | None] = []
    apply = lora_folding.FoldedLoraLinear.apply

    def spy(*args):
        dtypes.append(args[6])
        return apply(*args)

    monkeypatch.setattr(lora_folding.FoldedLoraLinear, "apply", spy)
    reward_fn = ComposedReward(models.reward, build_rules(CONCISE)).components
    trainer = PPOTrainer(SMALL_PPO, models, HFSampler(models), reward_fn)
    assert not trainer.takes_sampler_logprobs
    before = {k: v.clone() for k, v in models.policy_state().items()}
    metrics = trainer.iteration(PROMPTS, 0)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert metrics["gradient_steps"] >= 1
    assert torch.isfinite(torch.tensor([metrics["reward_raw"], metrics["kl_ref"]])).all()
    gap = metrics["sampler_logprob_gap"]
    assert 0 < gap < SMALL_PPO.sampler_logprob_tolerance and trainer.takes_sampler_logprobs
    # A tolerance below any bfloat16 rounding, not a fraction of the first gap: the gap
    # moves with the policy and the CPU (here 2.8e-5, then 1.7e-6, on a CPU that emulates
    # bfloat16 products), but a rounding difference stays above 1e-9.
    strict = PPOTrainer(
        dataclasses.replace(SMALL_PPO, sampler_logprob_tolerance=1e-9),
        models,
        HFSampler(models),
        reward_fn,
    )
    strict_gap = strict.iteration(PROMPTS, 0)["sampler_logprob_gap"]
    assert strict_gap > 1e-9 and not strict.takes_sampler_logprobs
    after = models.policy_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in models.peft_model.parameters())
    states = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert {t.dtype for t in states if t.dim() > 0} == {torch.float32}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    torch.cuda.device_count() < 2, reason="a 2-rank NCCL step needs 2 GPUs"
                ),
            ],
        ),
    ],
    ids=["gloo", "nccl"],
)
def test_a_two_rank_step_runs_on_each_ranks_device(tmp_path: Path, device: str):
    """Two processes as ``torchrun`` starts them: the backend follows the device, each rank
    trains on its own device (GPU ``LOCAL_RANK``), DDP averages the gradients and the
    trainer's collectives (mean, any, gather) agree."""
    mp.spawn(ddp_step, args=(2, free_port(), device, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_backend = "nccl" if device == "cuda" else "gloo"
    for r, out in enumerate(ranks):
        assert out["backend"] == expected_backend
        assert out["param_device"] == (f"cuda:{r}" if device == "cuda" else "cpu")
        # d(sum of Linear(x))/dW = the sum of x's rows: 2 rows of (r + 1), averaged over
        # ranks: (2 * 1 + 2 * 2) / 2 = 3 for every weight.
        assert torch.equal(out["grad"], torch.full((1, 4), 3.0))
        assert out["mean"] == 0.5 and out["any"] is True
        assert out["gathered"].tolist() == [0.0, 1.0]
