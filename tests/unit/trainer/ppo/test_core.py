"""PPO's pure functions against values worked out by hand, plus masking edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_grad_norm,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    normalize_and_clip_rewards,
    normalized_value_head,
    policy_loss,
    ptx_loss,
    shaped_rewards,
    value_loss,
    whiten,
)

NAN = float("nan")


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- masked statistics ------------------------------------------------------------------


def test_masked_mean_and_var_by_hand() -> None:
    x = t([1.0, 2.0, NAN], [3.0, 100.0, math.inf])
    mask = t([1, 1, 0], [1, 0, 0])
    # entries 1, 2, 3: mean 2; population var (1 + 0 + 1) / 3; unbiased (1 + 0 + 1) / 2
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(2 / 3)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(1.0)
    # per row: [1.5, 3.0]
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])


def test_masked_mean_of_nothing_is_zero() -> None:
    x = t([NAN, 5.0])
    mask = t([0, 0])
    assert masked_mean(x, mask).item() == 0.0
    assert masked_var(x, mask).item() == 0.0


def test_whiten_gives_mean_zero_std_one_over_masked_entries() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64) * 4 + 7
    mask = t([1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0])
    x[mask == 0] = NAN
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[mask == 0] == 0)
    # without shifting: same spread, the mean is kept
    kept = whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_by_hand() -> None:
    # [1, 3]: mean 2, population std 1 -> [-1, 1]
    out = whiten(t([1.0, 3.0, 9.0]), t([1, 1, 0]))
    assert out.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0])


def test_explained_variance_by_hand() -> None:
    returns = t([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones_like(returns)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
    # R - V = [0, 0, 0, -1]: var 0.1875; Var[R] = 1.25 -> 1 - 0.15 = 0.85
    assert explained_variance(t([1.0, 2.0, 3.0, 5.0]), returns, mask) == pytest.approx(0.85)
    # padding ignored
    padded_v, padded_r = t([1.0, 2.0, 3.0, 5.0, NAN]), t([1.0, 2.0, 3.0, 4.0, 99.0])
    assert explained_variance(padded_v, padded_r, t([1, 1, 1, 1, 0])) == pytest.approx(0.85)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


# --- log-probabilities and entropy -------------------------------------------------------


def test_logprobs_from_logits_by_hand() -> None:
    # probabilities [0.5, 0.25, 0.25]; a constant shift of the logits changes nothing
    logits = torch.log(t([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])).unsqueeze(0) + 3.0  # [1, 2, 3]
    tokens = torch.tensor([[0, 1]])
    assert logprobs_from_logits(logits, tokens).tolist()[0] == pytest.approx(
        [math.log(0.5), math.log(0.25)]
    )
    # temperature 2: p ~ p^(1/2) = [0.707107, 0.5, 0.5] / 1.707107
    # -> p(0) = sqrt(2) - 1 = 0.414214, log p(0) = -0.881374
    hot = logprobs_from_logits(logits, tokens, temperature=2.0)
    assert hot[0, 0].item() == pytest.approx(math.log(math.sqrt(2) - 1))


def test_logprobs_match_log_softmax_gather() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 11)
    tokens = torch.randint(0, 11, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens), expected, atol=1e-6)


def test_entropy_by_hand() -> None:
    # uniform over 4: log 4 = 1.386294; [0.5, 0.25, 0.25]: 0.5 ln 2 + 0.5 ln 4 = 1.039721
    uniform = torch.zeros(1, 1, 4, dtype=torch.float64)
    assert entropy_from_logits(uniform, t([1])).item() == pytest.approx(1.386294, abs=1e-6)
    skewed = torch.log(t([0.5, 0.25, 0.25])).reshape(1, 1, 3)
    assert entropy_from_logits(skewed, t([1])).item() == pytest.approx(1.039721, abs=1e-6)
    # a padded position with other logits does not count
    both = torch.cat([skewed, torch.tensor([[[9.0, 0.0, 0.0]]], dtype=torch.float64)], dim=1)
    assert entropy_from_logits(both, t([1, 0])).item() == pytest.approx(1.039721, abs=1e-6)


def test_ptx_loss_is_next_token_nll() -> None:
    # uniform over 4 -> NLL log 4 at every counted position
    logits = torch.zeros(1, 3, 4)
    logits[0, 2] = torch.tensor([50.0, 0.0, 0.0, 0.0])  # padded position: would be ~50 nats
    loss = ptx_loss(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(math.log(4), abs=1e-6)


# --- KL -----------------------------------------------------------------------------------


def test_kl_estimators_by_hand() -> None:
    logp = torch.log(t([0.5, 0.25]))
    ref = torch.log(t([0.25, 0.5]))
    # k1 = log(p / p_ref): log 2, -log 2
    assert kl_penalty(logp, ref, "k1").tolist()[0] == pytest.approx([math.log(2), -math.log(2)])
    # k3, r = p_ref / p: r = 0.5 -> -0.5 + log 2 = 0.193147; r = 2 -> 1 - log 2 = 0.306853
    assert kl_penalty(logp, ref, "k3").tolist()[0] == pytest.approx([0.193147, 0.306853], abs=1e-6)


def test_kl_is_zero_when_policies_agree_and_k3_never_negative() -> None:
    torch.manual_seed(2)
    logp = torch.randn(4, 7)
    for estimator in ("k1", "k3"):
        assert torch.all(kl_penalty(logp, logp.clone(), estimator) == 0)
    ref = logp + 5 * torch.randn(4, 7)
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)


def test_unknown_kl_estimator_is_rejected() -> None:
    with pytest.raises(ValueError, match="k2"):
        # the refusal tested: "k2" is not a KLEstimator
        kl_penalty(torch.zeros(1), torch.zeros(1), "k2")  # type: ignore[arg-type]


# --- reward shaping and normalisation ----------------------------------------------------


def test_last_token_index() -> None:
    mask = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    assert last_token_index(mask).tolist() == [2, 0, -1, 3]


def test_shaped_rewards_by_hand() -> None:
    kl = t([0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    # -0.1 * kl on response tokens; score at the last one; padding and empty rows 0
    rewards = shaped_rewards(t(2.0, -1.0, 7.0).squeeze(0), kl, 0.1, mask)
    assert rewards.tolist()[0] == pytest.approx([-0.01, -0.02, 1.97, 0.0])
    assert rewards.tolist()[1] == pytest.approx([-1.05, 0.0, 0.0, 0.0])
    assert rewards.tolist()[2] == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("splits", [[10], [3, 7], [1, 1, 8], [5, 0, 5]])
def test_running_moments_match_numpy_on_split_batches(splits: list[int]) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(4.0, 3.0, size=sum(splits))
    moments = RunningMoments()
    start = 0
    for size in splits:
        moments.update(torch.from_numpy(data[start : start + size]))
        start += size
    assert moments.count == data.size
    assert moments.mean == pytest.approx(data.mean())
    assert moments.std == pytest.approx(data.std())  # population (ddof=0)


def test_normalize_and_clip_rewards_by_hand() -> None:
    moments = RunningMoments()
    # [1, 2, 3, 4]: mean 2.5, std sqrt(1.25) = 1.118034 ->
    # [-1.341641, -0.447214, 0.447214, 1.341641], clipped to +-1
    out = normalize_and_clip_rewards(t(1.0, 2.0, 3.0, 4.0).squeeze(0), moments, clip=1.0)
    assert out.tolist() == pytest.approx([-1.0, -0.447214, 0.447214, 1.0], abs=1e-6)
    # scale only: 4 / 1.118034 = 3.577709 (no update, moments unchanged)
    scaled = normalize_and_clip_rewards(
        t(4.0).squeeze(0), moments, clip=10.0, shift_mean=False, update=False
    )
    assert scaled.item() == pytest.approx(3.577709, abs=1e-6)
    assert moments.count == 4


def test_normalize_first_single_score_has_unit_scale() -> None:
    out = normalize_and_clip_rewards(t(3.0).squeeze(0), RunningMoments(), clip=5.0)
    assert out.item() == 0.0


# --- GAE ----------------------------------------------------------------------------------


def test_gae_by_hand_three_tokens() -> None:
    rewards, values = t([0.1, -0.2, 1.0]), t([0.5, 0.4, 0.6])
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45); V after the last token = 0
    # t=2: delta = 1.0 + 0.9*0   - 0.6 =  0.4 ; A2 = 0.4
    # t=1: delta = -0.2 + 0.9*0.6 - 0.4 = -0.06; A1 = -0.06 + 0.45*0.4  = 0.12
    # t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04; A0 = -0.04 + 0.45*0.12 = 0.014
    # returns = A + V = [0.514, 0.52, 1.0]
    adv, ret = gae(rewards, values, torch.ones_like(rewards), gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.014, 0.12, 0.4])
    assert ret.tolist()[0] == pytest.approx([0.514, 0.52, 1.0])


def test_gae_ignores_right_padding() -> None:
    rewards = t([0.1, -0.2, 1.0, 0.0], [0.1, -0.2, 1.0, 5.0])
    values = t([0.5, 0.4, 0.6, 0.0], [0.5, 0.4, 0.6, 7.0])
    mask = t([1, 1, 1, 0], [1, 1, 1, 0])
    rewards[1, 3], values[1, 3] = NAN, NAN
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    for row in range(2):
        assert adv[row].tolist() == pytest.approx([0.014, 0.12, 0.4, 0.0])
        assert ret[row].tolist() == pytest.approx([0.514, 0.52, 1.0, 0.0])


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards, values = t([1.0, 2.0, 3.0, 0.0]), t([0.5, 0.5, 0.5, 9.0])
    mask = t([1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret.tolist()[0] == pytest.approx([6.0, 5.0, 3.0, 0.0])
    assert adv.tolist()[0] == pytest.approx([5.5, 4.5, 2.5, 0.0])


def test_gae_all_masked_row_is_zero() -> None:
    adv, ret = gae(t([1.0, 2.0]), t([3.0, 4.0]), t([0, 0]), gamma=1.0, lam=0.95)
    assert adv.tolist() == [[0.0, 0.0]] and ret.tolist() == [[0.0, 0.0]]


# --- policy loss --------------------------------------------------------------------------


def _policy_case() -> tuple[torch.Tensor, torch.Tensor]:
    ratios = t([0.5, 0.9, 1.1, 1.5])
    return torch.log(ratios).requires_grad_(True), torch.zeros_like(ratios)


def test_policy_loss_by_hand() -> None:
    logp, old = _policy_case()
    adv, mask = torch.ones_like(old), torch.ones_like(old)
    loss, clip_fraction, approx_kl = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # A = 1: max(-r, -clip(r, 0.8, 1.2)) = [-0.5, -0.9, -1.1, -1.2] -> mean -0.925
    assert loss.item() == pytest.approx(-0.925)
    # |r - 1| > 0.2 for r = 0.5 and 1.5
    assert clip_fraction.item() == pytest.approx(0.5)
    # (r - 1) - log r = [0.193147, 0.005361, 0.004690, 0.094535] -> mean 0.074433
    assert approx_kl.item() == pytest.approx(0.074433, abs=1e-6)


def test_policy_loss_gradient_is_zero_only_where_the_clip_binds() -> None:
    # d loss / d log p_t = -A_t * r_t / n where the unclipped term is active, else 0
    for sign in (1.0, -1.0):
        logp, old = _policy_case()
        adv = torch.full_like(old, sign)
        loss, _, _ = policy_loss(logp, old, adv, torch.ones_like(old), clip_range=0.2)
        loss.backward()
        grad = logp.grad.tolist()[0]
        if sign > 0:  # A > 0: ratio 1.5 (> 1 + eps) is clipped; 0.5 still pushed up
            assert grad == pytest.approx([-0.5 / 4, -0.9 / 4, -1.1 / 4, 0.0])
        else:  # A < 0: ratio 0.5 (< 1 - eps) is clipped; 1.5 still pushed down
            assert grad == pytest.approx([0.0, 0.9 / 4, 1.1 / 4, 1.5 / 4])


def test_policy_loss_ignores_padding_even_nan() -> None:
    logp = torch.log(t([0.5, 0.9, 1.1, 1.5, 1.0])).requires_grad_(True)
    with torch.no_grad():
        logp[0, 4] = NAN
    old = t([0.0, 0.0, 0.0, 0.0, 50.0])
    adv = t([1.0, 1.0, 1.0, 1.0, NAN])
    mask = t([1, 1, 1, 1, 0])
    loss, clip_fraction, approx_kl = policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.925)
    assert clip_fraction.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.074433, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 4] == 0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, clip_fraction, approx_kl = policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-2.5)  # -(1 + 2 + 3 + 4) / 4
    assert clip_fraction.item() == 0.0 and approx_kl.item() == 0.0


# --- value loss ---------------------------------------------------------------------------


def test_value_loss_by_hand() -> None:
    values = t([0.5, 0.1, NAN]).requires_grad_(True)
    old, returns, mask = t([0.0, 0.0, 3.0]), t([1.0, 1.0, 8.0]), t([1, 1, 0])
    # token 0: (0.5 - 1)^2 = 0.25 vs clipped V = 0.2: (0.2 - 1)^2 = 0.64 -> 0.64
    # token 1: (0.1 - 1)^2 = 0.81, within the clip -> 0.81
    # 0.5 * (0.64 + 0.81) / 2 = 0.3625
    loss, clip_fraction = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.3625)
    assert clip_fraction.item() == pytest.approx(0.5)
    loss.backward()
    # the clipped token gets no gradient; token 1: 0.5 * 2 * (0.1 - 1) / 2 = -0.45
    assert values.grad.tolist()[0] == pytest.approx([0.0, -0.45, 0.0])


# --- gradient clipping ----------------------------------------------------------------------


def _params_with_grads(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
        p.grad = torch.tensor(g, dtype=torch.float64)
        params.append(p)
    return params


def test_clip_grad_norm_scales_a_large_gradient_to_the_bound_by_hand() -> None:
    # global norm sqrt(3^2 + 4^2 + 12^2) = 13 > 6.5: every gradient halves (up to 1e-6).
    params = _params_with_grads([3.0, 4.0], [12.0])
    no_grad = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))  # no gradient: skipped
    norm = clip_grad_norm([*params, no_grad], max_norm=6.5)
    assert norm.item() == pytest.approx(13.0)  # the norm before clipping (what is logged)
    scale = 6.5 / (13.0 + 1e-6)
    assert params[0].grad.tolist() == pytest.approx([3.0 * scale, 4.0 * scale], rel=1e-12)
    assert params[1].grad.tolist() == pytest.approx([12.0 * scale], rel=1e-12)
    clipped = torch.cat([p.grad for p in params]).norm().item()
    assert clipped == pytest.approx(6.5, rel=1e-6)
    assert no_grad.grad is None


def test_clip_grad_norm_leaves_a_gradient_within_the_bound_unchanged() -> None:
    params = _params_with_grads([3.0, 4.0], [12.0])
    norm = clip_grad_norm(params, max_norm=13.5)
    assert norm.item() == pytest.approx(13.0)
    assert params[0].grad.tolist() == [3.0, 4.0]
    assert params[1].grad.tolist() == [12.0]


def test_clip_grad_norm_reports_a_non_finite_gradient() -> None:
    params = _params_with_grads([1.0, NAN])
    assert not math.isfinite(clip_grad_norm(params, max_norm=1.0).item())


# --- KL controllers -----------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand() -> None:
    # target 6, horizon 10000, 512 steps
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=512)  # e = 9/6 - 1 = 0.5 -> clipped 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))  # 0.101024
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=5.4, n_steps=512)  # e = -0.1
    assert ctl.value == pytest.approx(0.099488)
    ctl.update(current_kl=6.0, n_steps=512)  # on target: unchanged
    assert ctl.value == pytest.approx(0.099488)
    ctl.update(current_kl=0.0, n_steps=10000)  # e = -1 -> clipped -0.2: x 0.8
    assert ctl.value == pytest.approx(0.099488 * 0.8)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = FixedKLController(0.02)
    ctl.update(current_kl=100.0, n_steps=10**6)
    assert ctl.value == 0.02


def test_normalized_value_head_predicts_normalized_scores() -> None:
    weight, bias = torch.tensor([[2.0, -4.0]]), torch.tensor([3.0])
    new_weight, new_bias = normalized_value_head(weight, bias, mean=1.0, std=2.0)
    assert new_weight.tolist() == [[1.0, -2.0]] and new_bias.tolist() == [1.0]
    hidden = torch.tensor([[0.5, 0.25], [-1.0, 3.0]])
    raw = hidden @ weight.T + bias  # [[3.0], [-11.0]]
    assert (hidden @ new_weight.T + new_bias).tolist() == ((raw - 1.0) / 2.0).tolist()
    # A degenerate std (one score seen) counts as 1, as in reward normalisation.
    assert normalized_value_head(weight, bias, 1.0, 0.0)[1].tolist() == [2.0]
