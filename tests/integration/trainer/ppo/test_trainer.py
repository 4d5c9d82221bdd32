"""PPOTrainer's switches on the real demo model: critic warm-up, the approximate-KL early
stop, PPO-ptx, the log-prob recomputation, folding, and the critic initialised from the
learned reward model (transformers sampler).

Most tests here check plumbing exactly (gradients equal PEFT's, rows scored alone equal
rows scored in chunks, ...) and use a flat reward model (head 0, the reward is the rule
terms): a learned one would add a reward model forward and nothing to check. The critic
test uses the reward model learned from simulated feedback (``learned_reward``), because
what it checks is what that reward model's adapter and head give the critic."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.learned_reward import LearnedReward
from tests.fixtures.ppo import CONCISE, SMALL_PPO, flat_reward_model
from tests.fixtures.reward_feedback import corpus_answers, is_liked
from trainer.common.lora_folding import cast_base, fold_in_training, folded
from trainer.common.onednn_layout import layout_pays
from trainer.demo.corpus import sample_prompts
from trainer.ppo.models import POLICY, PolicyModels, TokenBatch
from trainer.ppo.rollout.base import render_prompts
from trainer.ppo.rollout.hf import HFSampler
from trainer.ppo.trainer import PPOTrainer
from trainer.reward.model import load_reward_model, transformer_of
from trainer.reward.rules import ComposedReward, build_rules

pytestmark = pytest.mark.slow

CONFIG = SMALL_PPO
BF16 = torch.bfloat16
PROMPTS = [[{"role": "user", "content": p.text}] for p in sample_prompts(5, 16)]


@pytest.fixture(scope="module")
def reward_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reward")
    flat_reward_model(demo_model_dir).save(out)
    return out


def _trainer(demo_model_dir: Path, reward_dir: Path, **changes) -> PPOTrainer:
    models = PolicyModels.load(demo_model_dir, reward_dir)
    reward_fn = ComposedReward(models.reward, build_rules(CONCISE)).components
    ptx = changes.pop("ptx_examples", ())
    config = dataclasses.replace(CONFIG, **changes)
    return PPOTrainer(config, models, HFSampler(models), reward_fn, ptx_examples=ptx)


def test_the_learned_reward_model_prefers_what_the_users_like(
    demo_model_dir: Path, learned_reward: LearnedReward
):
    """The reward model PPO optimises knows the hidden preference beyond its own held-out
    split: on fresh prompts, written answers the simulated users like (concise, honest)
    outscore ones they do not (verbose, fabricated) for most prompts."""
    prompts, first, second = corpus_answers(120, seed=11)
    rows = [
        (p, a, b) if is_liked(p, a) else (p, b, a)
        for p, a, b in zip(prompts, first, second, strict=True)
        if is_liked(p, a) != is_liked(p, b)
    ]
    assert len(rows) >= 30
    conversations = [[{"role": "user", "content": p.text}] for p, _, _ in rows]
    model = load_reward_model(learned_reward.path)
    liked = model.score(conversations, [a for _, a, _ in rows])
    disliked = model.score(conversations, [b for _, _, b in rows])
    accuracy = float((liked > disliked).float().mean())
    print(f"held out {learned_reward.metrics}; fresh written pairs: accuracy {accuracy:.3f}")
    assert accuracy >= 0.8


def test_a_critic_from_the_learned_reward_model_starts_as_that_reward_model(
    demo_model_dir: Path, learned_reward: LearnedReward
):
    """InstructGPT initialises the value function from the reward model. Checked exactly:
    the critic's value at an answer's last token is the reward model's score of that
    answer (its adapter and head were copied, not re-initialised).

    Then both critics see one first rollout (same seed; a fresh policy adapter is the
    base), scored by the learned model alone: the same rewards, a fresh critic (a zero
    head) explains none of the returns' variance, and the reward-initialised one's share
    is printed, not asserted. It depends on the learned reward model, not on this code:
    over six prompt seeds it was 0.11-0.17 on the machine this was first measured on and
    -0.04-0.01 on another (2026-12-02), where the same reward model scored held-out pairs
    with accuracy 1.0. Its values away from the last token carry little signal there."""
    models = PolicyModels.load(demo_model_dir, learned_reward.path, critic_init="reward")
    conversations = [[{"role": "user", "content": p.text}] for p in sample_prompts(2, 8)]
    answers = ["I don't know.", "The capital is Mozoton.", "Blue.", "It is 12."] * 2
    with torch.no_grad():
        scores = models.reward.score(conversations, answers)
        ids, attention = models.reward.encode(conversations, answers)
        rows = [ids[i, : int(attention[i].sum())].tolist() for i in range(len(answers))]
        # A one-token response after each whole row: its value is read at the row's end.
        batch = TokenBatch.build(rows, [[0]] * len(rows), pad_id=0)
        values = models.actor_critic.critic(batch)[:, 0]
    assert torch.allclose(values, scores, atol=1e-4), (values, scores)
    assert scores.std() > 1.0  # the premise: the scores differ, so equality means something

    config = dataclasses.replace(
        CONFIG, rollout_batch_size=64, mini_batch_size=16, max_new_tokens=48
    )
    prompts = [[{"role": "user", "content": p.text}] for p in sample_prompts(2, 64)]
    variance = {}
    for init in ("reward", "fresh"):
        models = PolicyModels.load(demo_model_dir, learned_reward.path, critic_init=init)
        reward_fn = ComposedReward(models.reward).components
        trainer = PPOTrainer(config, models, HFSampler(models), reward_fn)
        metrics = trainer.iteration(prompts, 0)
        variance[init] = (metrics["explained_variance"], metrics["reward_raw"])
    print(f"explained variance and reward (reward-initialised critic, fresh): {variance}")
    (reward_ev, reward_raw), (fresh_ev, fresh_raw) = variance["reward"], variance["fresh"]
    assert reward_raw == fresh_raw, variance  # the same rollout, scored the same
    assert fresh_ev == 0.0, variance
    assert math.isfinite(reward_ev), variance


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _changed(before: list[torch.Tensor], params: list[torch.nn.Parameter]) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


def test_critic_warmup_updates_only_the_critic(demo_model_dir: Path, reward_dir: Path):
    trainer = _trainer(demo_model_dir, reward_dir, critic_warmup_iterations=1)
    policy = trainer.models.param_groups(1, 1)[0]["params"]
    critic = trainer.models.param_groups(1, 1)[1]["params"]
    policy_before, critic_before = _snapshot(policy), _snapshot(critic)

    warm = trainer.iteration(PROMPTS, 0)
    assert warm["critic_warmup"] is True
    assert not _changed(policy_before, policy)
    assert _changed(critic_before, critic)

    after = trainer.iteration(PROMPTS, 1)  # the first policy update
    assert after["critic_warmup"] is False
    assert _changed(policy_before, policy)


def test_early_stop_on_approximate_kl(demo_model_dir: Path, reward_dir: Path):
    trainer = _trainer(demo_model_dir, reward_dir, ppo_epochs=4, approx_kl_stop=1e-9)
    trainer.iteration(PROMPTS, 0)
    metrics = trainer.iteration(PROMPTS, 1)
    # 4 epochs x 2 mini-batches = 8 steps without the stop; the first step that moves the
    # policy at all (approx KL > 1e-9) ends the iteration.
    assert metrics["early_stopped"] is True
    assert metrics["gradient_steps"] < CONFIG.rollout_batch_size // CONFIG.mini_batch_size * 4
    unstopped = _trainer(demo_model_dir, reward_dir, ppo_epochs=4, approx_kl_stop=0.0)
    assert unstopped.iteration(PROMPTS, 0)["gradient_steps"] == 8


def test_ppo_ptx_mixes_the_sft_likelihood_in(demo_model_dir: Path, reward_dir: Path):
    models = PolicyModels.load(demo_model_dir, reward_dir)
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    answers = [models.tokenizer("Paris.<|end|>", add_special_tokens=False)["input_ids"]] * 4
    examples = list(zip(prompts, answers, strict=True))
    with pytest.raises(ValueError, match="ptx_examples"):
        _trainer(demo_model_dir, reward_dir, ptx_coef=1.0)
    trainer = _trainer(demo_model_dir, reward_dir, ptx_coef=1.0, ptx_examples=examples)
    metrics = trainer.iteration(PROMPTS, 0)
    assert metrics["ptx_loss"] is not None and metrics["ptx_loss"] > 0
    plain = _trainer(demo_model_dir, reward_dir).iteration(PROMPTS, 0)
    assert plain["ptx_loss"] is None


def test_trainer_logprobs_match_the_transformers_sampler(demo_model_dir: Path, reward_dir: Path):
    """The same float32 model sampled and re-scored: the logged gap is rounding only (what
    lets ``recompute_logprobs="auto"`` take the decode loop's own)."""
    # Every row re-scored by the scoring pass, the reference's own code path: a fresh
    # adapter's KL is then exactly 0 (the update's forward, at other shapes, rounds apart).
    trainer = _trainer(
        demo_model_dir, reward_dir, recompute_logprobs="always", first_mini_batch_from_update=False
    )
    metrics = trainer.iteration(PROMPTS, 0)
    assert metrics["sampler_logprob_gap"] < 1e-4
    assert metrics["kl_ref"] == 0.0  # a fresh adapter (B = 0) is exactly the reference
    assert metrics["rollout_tokens"] > 0 and metrics["episodes"] == 16


def test_folded_passes_match_the_adapter_and_leave_the_base_untouched(
    demo_model_dir: Path, reward_dir: Path
):
    """No-gradient passes fold the adapter into copies of the base weights: the actor's
    logits match the LoRA layers' up to rounding, and the base (the reference) is the same
    tensors with the same bits afterwards."""
    models = PolicyModels.load(demo_model_dir, reward_dir, seed=1)
    with torch.no_grad():  # a non-trivial policy adapter, as after training
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], pad_id=0)
    base = {n: p for n, p in models.peft_model.named_parameters() if ".lora_" not in n}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base.items()}
    with torch.no_grad():
        reference = models.reference_logprobs(batch)
        models.use(POLICY)
        lora = models.response_logits(batch)  # the LoRA layers themselves
        with models.adapter(POLICY):  # no gradient: folded
            fold = models.response_logits(batch)
    torch.testing.assert_close(fold, lora, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        actor = models.actor_critic.actor(batch, with_entropy=False)[0]
        assert (actor - reference).abs().max() > 1e-2  # the adapter really changes the model
        assert torch.equal(models.reference_logprobs(batch), reference)
    for name, p in base.items():
        pointer, values = before[name]
        assert p.data_ptr() == pointer and torch.equal(p.detach(), values), name
    # Copies of the weights cannot train; a missing adapter is not the base.
    with pytest.raises(RuntimeError, match="no-gradient"), folded(models.peft_model, POLICY):
        pass
    with torch.no_grad(), pytest.raises(KeyError, match="nope"), folded(models.peft_model, "nope"):
        pass
    with pytest.raises(RuntimeError, match="no-gradient"), cast_base(models.peft_model, BF16):
        pass


@pytest.mark.skipif(
    not layout_pays(torch.zeros(1), None, 1), reason="this torch has no oneDNN linear ops"
)
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_decode_passes_on_weights_laid_out_for_onednn_are_the_folded_passes(
    demo_model_dir: Path, reward_dir: Path, precision: str
):
    """A decode loop's passes (``decode_rows``) multiply by the folded weights laid out for
    oneDNN, and the LM head by a laid-out copy of its own, in float32 or (on a CPU that
    multiplies bfloat16) under bfloat16 autocast: the policy's logits are the folded pass's
    up to rounding, exactly those layers take the layout and only for the body, the head's
    product is the head's own call (not the autocast cast the plain pass keeps), and the
    base weights are the same tensors with the same bits afterwards."""
    if precision == "bfloat16" and not layout_pays(torch.zeros(1), BF16, 1):
        pytest.skip("this CPU has no bfloat16 products")
    models, batch = _trained_policy(demo_model_dir, reward_dir, seed=1)
    models.to(torch.device("cpu"), precision)
    base = {n: p for n, p in models.peft_model.named_parameters() if ".lora_" not in n}
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base.items()}
    linears = [m for m in models.peft_model.modules() if type(m) is torch.nn.Linear]
    bases = [m.base_layer for m in models.peft_model.modules() if hasattr(m, "base_layer")]
    head = transformer_of(models.peft_model).get_output_embeddings()
    head_calls: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: head_calls.append(out))
    with torch.no_grad():
        reference = models.reference_logprobs(batch)
        with models.adapter(POLICY):
            policy = models.response_logits(batch)
        plain_calls = len(head_calls)
        with models.adapter(POLICY, decode_rows=4):
            laid_out = [m for m in linears if "forward" in vars(m)]
            policy_laid_out = models.response_logits(batch)
    hook.remove()
    expected = [m for m in linears if any(m is b for b in bases) or m is head]
    assert head in laid_out and laid_out == expected
    assert all("forward" not in vars(m) for m in linears)
    assert len(head_calls) == plain_calls + 1
    if precision == "float32":
        torch.testing.assert_close(policy_laid_out, policy, atol=1e-4, rtol=1e-4)
        assert not torch.equal(policy_laid_out, policy)  # another kernel: rounding differs
    else:  # bfloat16 products: a kernel's rounding is a bfloat16 step of a logit at most
        assert head_calls[-1].dtype == BF16
        torch.testing.assert_close(policy_laid_out, policy, atol=0.1, rtol=0.02)
    for name, p in base.items():
        pointer, values = before[name]
        assert p.data_ptr() == pointer and torch.equal(p.detach(), values), name
    with torch.no_grad():
        assert torch.equal(models.reference_logprobs(batch), reference)


def _trained_policy(
    demo_model_dir: Path, reward_dir: Path, seed: int
) -> tuple[PolicyModels, TokenBatch]:
    """Models whose policy adapter moves the model (random ``B``, as after training), and a
    batch of 4 rollouts of 1 to 3 tokens."""
    models = PolicyModels.load(demo_model_dir, reward_dir, seed=seed)
    with torch.no_grad():
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], pad_id=0)
    return models, batch


def test_folded_training_layers_give_loras_own_gradients(demo_model_dir: Path, reward_dir: Path):
    """The update's LoRA layers run folded (one product each); the loss and every gradient
    of the actor and critic adapters are PEFT's own LoRA layers', up to rounding."""
    models = PolicyModels.load(demo_model_dir, reward_dir, seed=2)
    with torch.no_grad():  # non-trivial adapters (B = 0 would hide a wrong dA) and head
        for name, p in models.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
        models.value_head.weight.normal_()  # the flat reward model's head is 0: no gradient
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], pad_id=0)
    weights = torch.linspace(-1.0, 1.0, batch.mask.numel()).reshape(batch.mask.shape)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = dict(models.peft_model.named_parameters())
        for p in params.values():
            p.grad = None
        logprobs, values, entropy, _ = models.actor_critic(batch)
        loss = (logprobs * weights).sum() + (values * weights).sum() - entropy
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in params.items() if p.grad is not None}

    folded_loss, folded_grads = loss_and_grads()
    assert fold_in_training(models.peft_model, enabled=False) == 4 * 7  # layers x projections
    peft_loss, peft_grads = loss_and_grads()
    torch.testing.assert_close(folded_loss, peft_loss, atol=1e-4, rtol=1e-5)
    assert set(folded_grads) == set(peft_grads)
    assert any(".policy." in n for n in peft_grads) and any(".critic." in n for n in peft_grads)
    for name, grad in peft_grads.items():  # rounding only: relative to the gradient's size
        error = (folded_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


def test_scoring_and_the_update_fold_the_same_weights(demo_model_dir: Path, reward_dir: Path):
    """A no-gradient pass (scoring, the decode loop) and a training forward fold the adapter
    into the same float32 weights, so at the rollout's policy the update's first log-probs
    are the scored ones bit for bit: the PPO ratio starts at exactly 1."""
    models, batch = _trained_policy(demo_model_dir, reward_dir, seed=3)
    with torch.no_grad():
        scored = models.actor_critic.actor(batch, with_entropy=False)[0]
    trained = models.actor_critic.actor(batch)[0]
    assert trained.requires_grad
    assert torch.equal(trained.detach(), scored)


def test_one_fold_serves_every_pass_inside_it_and_a_different_pass_is_refused(
    demo_model_dir: Path, reward_dir: Path
):
    """Scoring folds the adapter once for all its chunks: a pass of the same adapter inside
    runs on the folded weights as they are (folding again would add the adapter twice), and
    a pass of anything else inside (the reference, another adapter) is refused, since it
    would start from the folded weights, not the base ones."""
    models, batch = _trained_policy(demo_model_dir, reward_dir, seed=3)
    ac = models.actor_critic
    with torch.no_grad():
        alone = ac.actor(batch, with_entropy=False)[0]
        with models.adapter(POLICY):
            inside = ac.actor(batch, with_entropy=False)[0]
            with pytest.raises(RuntimeError, match="'reference' inside one of 'policy'"):
                models.reference_logprobs(batch)
        assert torch.equal(inside, alone)
        assert (alone - models.reference_logprobs(batch)).abs().max() > 1e-2  # base again


def test_the_reference_casts_its_weights_once_to_the_same_numbers(
    demo_model_dir: Path, reward_dir: Path
):
    """Under bfloat16 autocast, the no-gradient reference runs on base weights cast once
    for the pass: the log-probs autocast's per-call casts give, bit for bit, and the base
    weights are the same tensors afterwards."""
    models = PolicyModels.load(demo_model_dir, reward_dir, seed=3)
    models.autocast_dtype = torch.bfloat16
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], pad_id=0)
    base = {n: p for n, p in models.peft_model.named_parameters() if ".lora_" not in n}
    before = {n: p.data_ptr() for n, p in base.items()}
    with torch.no_grad():
        cast_once = models.reference_logprobs(batch)
        with models.peft_model.disable_adapter():  # autocast casting in every call
            hidden = models.response_hidden(batch)[batch.mask.bool()]
        per_call, _ = models.token_logprobs(
            hidden, batch.response_tokens(), models.actor_critic.temperature, with_entropy=False
        )
    assert torch.equal(cast_once, batch.unpack(per_call))
    assert all(p.data_ptr() == before[n] and p.dtype == torch.float32 for n, p in base.items())


def test_the_reward_model_scores_folded_as_it_trains(demo_model_dir: Path, reward_dir: Path):
    """``score`` (no gradient, folded) and ``rewards`` (the LoRA layers) agree."""
    models = PolicyModels.load(demo_model_dir, reward_dir)
    with torch.no_grad():
        for name, p in models.peft_model.named_parameters():
            if ".reward." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
        models.reward.head.weight.normal_()
    answers = ["Seven.", "I do not know.", "It is blue, blue, blue."]
    scored = models.reward.score(PROMPTS[:3], answers)
    trained = models.reward.rewards(PROMPTS[:3], answers).detach()
    torch.testing.assert_close(scored, trained, atol=1e-4, rtol=1e-4)
    assert scored.std() > 0


def test_rollout_scores_are_per_row_and_zero_on_padding(demo_model_dir: Path, reward_dir: Path):
    """Chunked scoring gives each row the numbers it gets alone, and nothing on padding
    (so sums over a row, like the sequence KL, see response tokens only)."""
    trainer = _trainer(demo_model_dir, reward_dir)
    models = trainer.models
    prompts = render_prompts(models.tokenizer, PROMPTS[:5])
    responses = [[40, 41, 42][: 1 + i % 3] for i in range(5)]
    batch = TokenBatch.build(prompts, responses, trainer.pad_id)
    logprobs, values, reference = trainer._score_tokens(batch)
    padding = ~batch.mask.bool()
    assert padding.any()
    for scores in (logprobs, values, reference):
        assert torch.all(scores[padding] == 0)
    for i in range(5):  # row i scored alone
        alone = TokenBatch.build(prompts[i : i + 1], responses[i : i + 1], trainer.pad_id)
        lp, v, ref = trainer._score_tokens(alone)
        n = len(responses[i])
        torch.testing.assert_close(logprobs[i, :n], lp[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i, :n], v[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference[i, :n], ref[0, :n], atol=1e-5, rtol=1e-5)


def test_streamed_scoring_equals_scoring_the_whole_rollout(demo_model_dir: Path, reward_dir: Path):
    """Rows are scored in chunks as the sampler finishes them; each row's log-probs, values,
    reference log-probs and reward are the ones the whole batch gets in one go."""
    trainer = _trainer(demo_model_dir, reward_dir, micro_batch_size=3, recompute_logprobs="always")
    rollout = trainer._rollout_and_score(PROMPTS, seed=11)
    batch = rollout.batch
    assert len(batch) == len(PROMPTS) and rollout.tokens == int(batch.mask.sum())
    whole = trainer._score_tokens(batch)
    streamed = (rollout.old_logprobs, rollout.values, rollout.ref_logprobs)
    for got, want in zip(streamed, whole, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    answers = trainer.models.tokenizer.batch_decode(
        [row[: int(n)] for row, n in zip(batch.response_ids, batch.mask.sum(1), strict=True)],
        skip_special_tokens=True,
    )
    with torch.inference_mode():
        parts = trainer.reward_fn(PROMPTS, answers)
    assert set(parts) == set(rollout.reward_parts)
    for name, value in parts.items():
        torch.testing.assert_close(rollout.reward_parts[name], value, atol=1e-5, rtol=1e-5)


def test_micro_batches_give_the_mini_batch_gradient(demo_model_dir: Path, reward_dir: Path):
    """Cutting a mini-batch into length-sorted micro-batches changes the padding, not the
    gradient: each micro-batch's loss is weighted by its share of the tokens."""
    whole = _trainer(demo_model_dir, reward_dir, micro_batch_size=8)
    pieces = _trainer(demo_model_dir, reward_dir, micro_batch_size=3)
    rollout = whole._rollout_and_score(PROMPTS, seed=3)
    batch, mask = rollout.batch, rollout.batch.mask.float()
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(mask.shape, generator=generator) * mask
    returns = torch.randn(mask.shape, generator=generator) * mask
    rows = torch.tensor([5, 0, 9, 14, 2, 7, 11, 3])
    stats = {}
    for name, trainer in (("whole", whole), ("pieces", pieces)):
        trainer.optimizer.zero_grad(set_to_none=True)
        stats[name] = trainer._accumulate(
            batch, rows, rollout.old_logprobs, rollout.values, advantages, returns, None, 5
        )
    grads = [[p.grad for p in t.models.trainable_parameters()] for t in (whole, pieces)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl"):
        torch.testing.assert_close(stats["whole"][key], stats["pieces"][key], atol=1e-6, rtol=1e-4)


def test_the_zero_warmup_adapter_loads_in_peft_and_changes_nothing(
    demo_model_dir: Path, tmp_path: Path
):
    """The adapter the vLLM engine warms its LoRA path up with covers every decoder
    projection and leaves the base's outputs as they are."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.ppo.rollout.vllm import write_zero_adapter

    write_zero_adapter(demo_model_dir, tmp_path / "zero", rank=8)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    ids = torch.tensor([[1, 5, 9, 40, 41]])
    with torch.no_grad():
        expected = base(ids).logits
        model = PeftModel.from_pretrained(base, str(tmp_path / "zero"))
        lora_layers = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
        assert len(lora_layers) == 7 * base.config.num_hidden_layers  # q k v o gate up down
        torch.testing.assert_close(model(ids).logits, expected)


def _backbone_passes(models: PolicyModels) -> list[int]:
    """A counter of the base backbone's forward passes (appended to by a hook)."""
    calls: list[int] = []
    models._backbone.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_shared_critic_reads_the_actors_trunk(demo_model_dir: Path, reward_dir: Path):
    """``critic="shared"``: no critic adapter; the values are the head on the policy
    adapter's hidden states; one backbone pass gives log-probs and values (two with an
    adapter critic); the value loss's gradient reaches the head only."""
    models = PolicyModels.load(demo_model_dir, reward_dir, critic="shared", seed=3)
    assert "critic" not in models.peft_model.peft_config
    assert not models.critic_from_reward
    assert not models.value_head.weight.detach().any()  # starts at zero
    with torch.no_grad():  # a non-trivial policy adapter and head
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
        models.value_head.weight.normal_()
    prompts = render_prompts(models.tokenizer, PROMPTS[:4])
    batch = TokenBatch.build(prompts, [[40, 41, 42], [43], [44, 45], [46]], pad_id=0)
    ac = models.actor_critic
    passes = _backbone_passes(models)
    with torch.no_grad():
        logprobs, values, _ = ac.evaluate(batch, with_entropy=False)
        assert len(passes) == 1
        actor = ac.actor(batch, with_entropy=False)[0]
        with models.adapter(POLICY):
            by_hand = models.value_head(models.response_hidden(batch)).squeeze(-1)
    keep = batch.mask.bool()
    torch.testing.assert_close(logprobs[keep], actor[keep])
    torch.testing.assert_close(values[keep], by_hand[keep])

    # The value loss trains the head, not the trunk (it would move the policy); the
    # policy's own loss still reaches the trunk through the same pass.
    policy = {n: p for n, p in models.peft_model.named_parameters() if ".policy." in n}
    logprobs, values, _, _ = ac(batch)
    (values * batch.mask).sum().backward(retain_graph=True)
    assert models.value_head.weight.grad is not None
    assert models.value_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in policy.values())
    (logprobs * batch.mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.values())

    separate = PolicyModels.load(demo_model_dir, reward_dir, critic="adapter")
    passes = _backbone_passes(separate)
    with torch.no_grad():
        separate.actor_critic.evaluate(batch, with_entropy=False)
    assert len(passes) == 2
    with pytest.raises(ValueError, match="critic must be"):
        PolicyModels.load(demo_model_dir, reward_dir, critic="value-model")


def test_a_shared_critic_learns_and_trains_the_policy(demo_model_dir: Path, reward_dir: Path):
    """Two iterations with a shared critic: the head leaves zero, values explain some of
    the returns by the second rollout, and the policy moves off the reference."""
    models = PolicyModels.load(demo_model_dir, reward_dir, critic="shared")
    reward_fn = ComposedReward(models.reward, build_rules(CONCISE)).components
    trainer = PPOTrainer(CONFIG, models, HFSampler(models), reward_fn)
    first = trainer.iteration(PROMPTS, 0)
    assert abs(first["kl_ref"]) < 1e-3  # a fresh adapter is the reference (decode rounding)
    assert models.value_head.weight.detach().any()
    second = trainer.iteration(PROMPTS, 1)
    assert second["kl_ref"] != 0.0
    assert math.isfinite(second["value_loss"]) and second["explained_variance"] > -1.0


def _nontrivial_policy(
    demo_model_dir: Path, reward_dir: Path, critic: str
) -> tuple[PolicyModels, Callable]:
    """Models whose policy adapter and value head are not their zero start (so the policy
    differs from the reference), with the flat reward's scoring function."""
    models = PolicyModels.load(demo_model_dir, reward_dir, critic=critic, seed=4)
    with torch.no_grad():
        for name, p in models.peft_model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(5)) * 0.05)
        models.value_head.weight.copy_(torch.linspace(-1, 1, models.value_head.in_features))
    return models, ComposedReward(models.reward, build_rules(CONCISE)).components


@pytest.mark.parametrize("critic", ["shared", "adapter"])
def test_the_decode_loops_numbers_are_the_training_passes(
    demo_model_dir: Path, reward_dir: Path, critic: str
):
    """``recompute_logprobs="auto"`` with the hf sampler takes the decode loop's log-probs
    (and a shared critic's values): equal to the recomputed ones up to rounding, the
    reference's exactly, with fewer backbone passes (the actor's, and a shared critic's,
    are saved)."""
    rollouts, passes = {}, {}
    for mode in ("auto", "always"):
        models, reward_fn = _nontrivial_policy(demo_model_dir, reward_dir, critic)
        config = dataclasses.replace(CONFIG, recompute_logprobs=mode)
        trainer = PPOTrainer(config, models, HFSampler(models), reward_fn)
        assert trainer.takes_sampler_logprobs == (mode == "auto")
        counter = _backbone_passes(models)
        rollouts[mode] = trainer._rollout_and_score(PROMPTS, seed=11)
        passes[mode] = len(counter)
    auto, always = rollouts["auto"], rollouts["always"]
    assert torch.equal(auto.batch.input_ids, always.batch.input_ids)  # the same samples
    keep = auto.batch.mask.bool()
    torch.testing.assert_close(
        auto.old_logprobs[keep], always.old_logprobs[keep], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(auto.values[keep], always.values[keep], atol=1e-4, rtol=0)
    assert torch.equal(auto.ref_logprobs, always.ref_logprobs)
    assert (auto.old_logprobs - auto.ref_logprobs)[keep].abs().max() > 1e-2  # not the base
    assert passes["auto"] < passes["always"]


def _rows_through_backbone(models: PolicyModels) -> dict[str, int]:
    """Rows the base backbone has run (added up by a hook), by the kind of pass: "update"
    (a gradient recorded), "scoring" (inference mode: scoring and the reward model) and
    "decode" (the rest: the decode loop's steps)."""
    rows = {"update": 0, "scoring": 0, "decode": 0}

    def count(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        kind = (
            "update"
            if torch.is_grad_enabled()
            else "scoring"
            if torch.is_inference_mode_enabled()
            else "decode"
        )
        rows[kind] += 0 if ids is None else int(ids.shape[0])

    models._backbone.register_forward_hook(count, with_kwargs=True)
    return rows


def _one_iteration(
    demo_model_dir: Path,
    reward_dir: Path,
    critic: str,
    count: Callable[[PolicyModels], Any] | None = None,
    prompts: list = PROMPTS,
    **changes: Any,
) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
    """One iteration of :data:`CONFIG` with ``changes`` from :func:`_nontrivial_policy`:
    its metrics, how far it moved each trainable parameter (after − before), and what
    ``count`` (a hook installed on the models before the iteration) returned."""
    models, reward_fn = _nontrivial_policy(demo_model_dir, reward_dir, critic)
    config = dataclasses.replace(CONFIG, **changes)
    trainer = PPOTrainer(config, models, HFSampler(models), reward_fn)
    counted = count(models) if count is not None else None
    before = [p.detach().clone() for p in models.trainable_parameters()]
    metrics = trainer.iteration(prompts, 0)
    moved = [p.detach() - b for p, b in zip(models.trainable_parameters(), before, strict=True)]
    return metrics, moved, counted


def _assert_trained_alike(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Two iterations moved every parameter alike up to float32 rounding: each tensor's
    two moves within 1 % of each other in norm. Not element by element: Adam divides each
    element's gradient by its own running scale, and where an element's gradients nearly
    cancel across steps it turns a rounding difference into a visible one (on an AVX2 CPU,
    one element of 1,536 moved 8.3e-6 apart, 3.7 % of its tensor's largest move, while
    no tensor's two moves were more than 0.1 % apart in norm). A wrong row, ratio or value
    moves the whole tensor."""
    for x, y in zip(a, b, strict=True):
        apart = float(torch.linalg.vector_norm(x - y))
        assert apart <= 1e-2 * float(torch.linalg.vector_norm(y)), (tuple(y.shape), apart)


@pytest.mark.parametrize("critic", ["shared", "adapter"])
def test_the_first_mini_batch_is_scored_by_its_own_update_forward(
    demo_model_dir: Path, reward_dir: Path, critic: str
):
    """``first_mini_batch_from_update``: scoring runs the actor on the rows outside the
    update's first mini-batch only (the reference still sees every row), the update's first
    forward stands in for the rest, and the iteration trains the policy as when every row
    is scored (the same rows, the same ratios up to rounding)."""
    trained, metrics, rows = {}, {}, {}
    for reuse in (True, False):
        metrics[reuse], trained[reuse], rows[reuse] = _one_iteration(
            demo_model_dir,
            reward_dir,
            critic,
            _rows_through_backbone,
            recompute_logprobs="always",
            first_mini_batch_from_update=reuse,
        )
    n, mini = len(PROMPTS), CONFIG.mini_batch_size
    assert metrics[True]["rows_scored_by_update"] == mini
    assert metrics[False]["rows_scored_by_update"] == 0
    actor_passes = 1 if critic == "shared" else 2  # an adapter critic: its own pass
    # Scoring ran the actor on all rows but the first mini-batch's; the update ran the same
    # forwards (one per row and actor pass); the decode loop sampled the same answers.
    assert rows[False]["scoring"] - rows[True]["scoring"] == actor_passes * mini
    assert rows[True]["update"] == rows[False]["update"] == actor_passes * n
    assert rows[True]["decode"] == rows[False]["decode"] > 0
    for key in ("policy_loss", "value_loss", "approx_kl", "kl_ref", "reward_raw"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-4, abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(trained[True], trained[False], strict=True))
    _assert_trained_alike(trained[True], trained[False])


def test_the_first_mini_batch_keeps_its_scoring_pass_where_its_forward_cannot_stand_in(
    demo_model_dir: Path, reward_dir: Path
):
    """Several micro-batches (their graphs would all be held), PPO-ptx, the sampler's own
    log-probs taken (no actor pass to save), or the iteration that measures their gap
    (it scores that mini-batch before the update): every row is scored as before."""
    ptx = [([1, 2, 3], [4, 5])]
    for changes in (
        {"recompute_logprobs": "always", "micro_batch_size": 4},
        {"recompute_logprobs": "always", "ptx_coef": 0.1, "ptx_examples": ptx},
        {"recompute_logprobs": "auto"},  # float32: the decode loop's own are taken
    ):
        trainer = _trainer(demo_model_dir, reward_dir, **changes)
        assert trainer._first_mini_batch(len(PROMPTS), 0) is None, changes
    trainer = _trainer(demo_model_dir, reward_dir, recompute_logprobs="always")
    first = trainer._first_mini_batch(len(PROMPTS), 0)
    assert first is not None and len(first) == CONFIG.mini_batch_size


def test_in_float32_the_first_iteration_measures_nothing(demo_model_dir: Path, reward_dir: Path):
    """float32 ("auto" with the decode loop as sampler): its log-probs are the training
    pass's up to rounding from the start, so even the first iteration runs no actor pass
    in scoring and measures no gap."""
    models, reward_fn = _nontrivial_policy(demo_model_dir, reward_dir, "shared")
    trainer = PPOTrainer(CONFIG, models, HFSampler(models), reward_fn)
    assert models.autocast_dtype is None and not trainer.measuring_sampler_gap
    rows = _rows_through_backbone(models)
    metrics = trainer.iteration(PROMPTS, 0)
    assert metrics["sampler_logprob_gap"] is None
    assert rows["scoring"] == 2 * len(PROMPTS)  # the reference and the reward model alone


@pytest.mark.parametrize(
    ("critic", "tolerance"), [("shared", 1.0), ("shared", 1e-9), ("adapter", 1e-9)]
)
def test_the_samplers_gap_is_measured_on_the_first_mini_batch_alone(
    demo_model_dir: Path, reward_dir: Path, critic: str, tolerance: float
):
    """``recompute_logprobs="auto"`` under bfloat16: the first iteration scores the
    update's first mini-batch alone with the actor and measures the decode loop's gap
    there, taking the decode loop's log-probs and values for the other rows. Within the
    tolerance they stay taken, and so they are from then on; past it (a tolerance below
    any rounding) the other rows get their actor pass before the advantages, so the update
    trains on the training model's own numbers, and later iterations recompute (the
    update's first forward standing in for its mini-batch). An adapter critic (the decode
    loop reads no values) scores the rows that take the decode loop's log-probs with a
    pass of its own."""
    models, reward_fn = _nontrivial_policy(demo_model_dir, reward_dir, critic)
    models = models.to(torch.device("cpu"), "bfloat16")
    config = dataclasses.replace(CONFIG, sampler_logprob_tolerance=tolerance)
    trainer = PPOTrainer(config, models, HFSampler(models), reward_fn)
    assert trainer.measuring_sampler_gap
    seen: dict[str, Any] = {}
    score, update = trainer._rollout_and_score, trainer._update

    def rollout_spy(*args: Any) -> Any:
        seen["rollout"] = score(*args)
        seen["sampled"] = seen["rollout"].old_logprobs.clone()
        return seen["rollout"]

    def update_spy(batch: TokenBatch, old_logprobs: torch.Tensor, *args: Any) -> Any:
        seen["old"] = old_logprobs.clone()
        return update(batch, old_logprobs, *args)

    trainer._rollout_and_score = rollout_spy  # type: ignore[method-assign]
    trainer._update = update_spy  # type: ignore[method-assign]
    rows = _rows_through_backbone(models)
    metrics = trainer.iteration(PROMPTS, 0)
    n, mini = len(PROMPTS), CONFIG.mini_batch_size
    rollout, keep = seen["rollout"], seen["rollout"].batch.mask.bool()
    first = trainer._first_draw(n, 0)
    others = torch.ones(n, dtype=torch.bool)
    others[first] = False
    assert metrics["rows_scored_by_update"] == 0
    assert metrics["sampler_logprob_gap"] > 1e-9  # bfloat16 decode and full pass round apart
    sampler, old = rollout.sampler_logprobs, seen["old"]
    # Scoring: the reference and the reward model (an adapter of this very backbone) on
    # every row, the actor on the first mini-batch; an adapter critic on the other rows;
    # the actor (and an adapter critic again) on none of them within the tolerance, on all
    # once past it.
    within, passes = tolerance == 1.0, 1 if critic == "shared" else 2
    others_scored = (passes - 1) + (0 if within else passes)
    assert rows["scoring"] == 2 * n + passes * mini + others_scored * (n - mini)
    assert rows["update"] == passes * n
    assert torch.equal(seen["sampled"][others], sampler[others])  # taken, not recomputed
    assert not torch.equal(old[first][keep[first]], sampler[first][keep[first]])
    if within:
        assert torch.equal(old[others], sampler[others])
    else:
        # Recomputed: apart from the decode loop's by rounding, as the first mini-batch is.
        gap = (old - sampler).abs()[others][keep[others]]
        assert gap.max() > 0 and gap.mean() < 0.05
    assert trainer.takes_sampler_logprobs == within
    assert not trainer.measuring_sampler_gap
    again = trainer.iteration(PROMPTS, 1)
    assert (again["sampler_logprob_gap"] is None) == within
    assert again["rows_scored_by_update"] == (0 if within else mini)


def test_an_adapter_critic_trains_the_same_with_activation_checkpointing(
    demo_model_dir: Path, reward_dir: Path
):
    """The critic adapter's forward runs between the actor's and the backward; the actor's
    checkpointed layers replay with the policy adapter active again, so an iteration trains
    the weights it trains without checkpointing."""
    trained = {}
    for checkpointing in (False, True):
        _, trained[checkpointing], _ = _one_iteration(
            demo_model_dir, reward_dir, "adapter", activation_checkpointing=checkpointing
        )
    for a, b in zip(trained[True], trained[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


SYSTEM = "Answer the question in one short sentence, politely, and in plain words."


@pytest.mark.parametrize("critic", ["shared", "adapter"])
def test_a_shared_system_prompt_runs_once_per_pass(
    demo_model_dir: Path, reward_dir: Path, critic: str
):
    """Prompts that open with the same system message: every scoring and update pass runs
    that prefix as one row (the backbone computes ``prefix_tokens_shared`` token positions
    fewer), and the iteration's numbers and trained weights are those of whole rows."""
    prompts = [[{"role": "system", "content": SYSTEM}, *p] for p in PROMPTS]
    trained, metrics, tokens = {}, {}, {}
    for minimum in (8, 0):
        metrics[minimum], trained[minimum], tokens[minimum] = _one_iteration(
            demo_model_dir,
            reward_dir,
            critic,
            _tokens_through_backbone,
            prompts,
            recompute_logprobs="always",
            shared_prefix_min_tokens=minimum,
        )
    shared = metrics[8]["prefix_tokens_shared"]
    assert metrics[0]["prefix_tokens_shared"] == 0
    # The template's BOS and system turn, in every row of every pass but one per pass.
    assert shared >= len(PROMPTS) * 10
    assert tokens[0][0] - tokens[8][0] == shared
    for key in ("policy_loss", "value_loss", "approx_kl", "kl_ref", "reward_raw"):
        assert metrics[8][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6)
    _assert_trained_alike(trained[8], trained[0])


def test_the_decode_loop_runs_a_shared_system_prompt_once(demo_model_dir: Path, reward_dir: Path):
    """Prompts that open with the same system message: the decode loop's prefill runs their
    common prefix as one row, into every row's cache, and samples what it samples running
    each prompt whole: the same tokens, their log-probs and values up to rounding."""
    models, _ = _nontrivial_policy(demo_model_dir, reward_dir, "shared")
    conversations = [[{"role": "system", "content": SYSTEM}, *p] for p in PROMPTS]
    prompt_ids = render_prompts(models.tokenizer, conversations)
    columns = zip(*prompt_ids, strict=False)  # as long as the shortest prompt
    prefix = next(i for i, column in enumerate(columns) if len(set(column)) > 1)
    assert prefix >= 16  # the template's BOS and system turn
    sampler, tokens = HFSampler(models), _tokens_through_backbone(models)
    rows, computed = {}, {}
    for minimum in (0, 8):
        models.shared_prefix_min_tokens = minimum
        before, shared_before = tokens[0], models.prefix_tokens_shared
        (rows[minimum],) = sampler.stream(prompt_ids, max_new_tokens=12, temperature=1.0, seed=3)
        computed[minimum] = tokens[0] - before
        assert models.prefix_tokens_shared - shared_before == (
            prefix * (len(PROMPTS) - 1) if minimum else 0
        )
    assert computed[0] - computed[8] == prefix * (len(PROMPTS) - 1)
    for whole, shared in zip(rows[0], rows[8], strict=True):
        assert shared.response_ids == whole.response_ids
        assert shared.sampler_logprobs == pytest.approx(whole.sampler_logprobs, abs=1e-5)
        # float32 rounding of values near 10: 1.3e-6 of them apart on an AMX CPU
        assert shared.values == pytest.approx(whole.values, rel=1e-5, abs=1e-5)
    assert any(v != 0 for row in rows[8] for v in row.values or [])


def _tokens_through_backbone(models: PolicyModels) -> list[int]:
    """Token positions the base backbone has computed, added up by a hook (the decode loop's
    steps included: a run that shares a prefix samples the same tokens as one that does
    not)."""
    total = [0]

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            total[0] += ids.numel()

    models._backbone.register_forward_pre_hook(count, with_kwargs=True)
    return total
