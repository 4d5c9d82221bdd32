"""The algorithmic core of PPO for language models: pure functions over tensors.

Every PPO detail, named once, in the order it happens in a round (CleanRL style):

1. rollout: sample responses; :func:`logprobs_from_logits` for the policy (``logprobs``)
   and the frozen reference (``ref_logprobs``); the critic gives ``values``; the reward
   model gives one ``score`` per sequence.
2. reward: :func:`normalize_and_clip_rewards` (PPO-max) on the scores, then
   :func:`kl_penalty` per token and :func:`shaped_rewards` (``-beta * kl`` on every token,
   the score added on the last one).
3. advantages: :func:`gae` (advantages and returns), then :func:`whiten` the advantages.
4. update, per mini-batch and epoch: :func:`policy_loss` (clipped surrogate, clip fraction,
   approx KL for early stopping), :func:`value_loss` (clipped), :func:`entropy_from_logits`
   (logged, optional bonus), :func:`ptx_loss` (PPO-ptx); gradients clipped to a global
   norm by :func:`clip_grad_norm`.
5. after the round: the KL controller (:class:`AdaptiveKLController` or
   :class:`FixedKLController`) updates ``beta``; :func:`explained_variance` is logged.

Shapes: per-token tensors are ``[batch, response_len]``, right-padded; ``mask`` is 1 on
response tokens and 0 on padding. A masked position never affects a result (it may hold
anything, even ``nan``), and a row with no response token contributes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trainer.ppo.config import KLEstimator

# --- masked statistics ------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * m) / sum(m)`` over ``dim`` (all entries if None); 0 where ``sum(m) = 0``.

    Padding is selected away with ``torch.where``, so ``nan``/``inf`` there cannot leak.
    """
    m = mask.to(x.dtype)
    total = torch.where(mask.bool(), x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1.0)
    return total.sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over masked entries: ``sum(m * (x - mean)^2) / n`` (``n - 1`` if unbiased).

    ``n = sum(m)``; the denominator is floored at 1, so no or one entry gives 0.
    """
    mean = masked_mean(x, mask)
    centred = torch.where(mask.bool(), x - mean, torch.zeros_like(x))
    n = mask.to(x.dtype).sum()
    denominator = (n - 1.0 if unbiased else n).clamp(min=1.0)
    return (centred**2).sum() / denominator


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + 1e-8)`` over entries with ``m = 1``.

    ``var`` is the population variance, so the result has mean 0 and std 1 (ddof=0) over
    masked entries. With ``shift_mean=False`` the mean is added back (only rescaled).
    Padding comes out 0. Used on advantages (PPO-max, Zheng et al. 2023, section 5.3).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over masked entries (CleanRL's critic diagnostic).

    1 is a perfect critic, 0 no better than a constant, negative worse; ``nan`` if
    ``Var[R] = 0``.
    """
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


# --- log-probabilities and entropy -------------------------------------------------------


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log softmax(logits / T)[token]`` per position: ``[B, L, V], [B, L] -> [B, L]``.

    Shift convention: a causal LM's ``logits[:, t]`` predict ``input_ids[:, t + 1]``, so
    the caller passes ``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]`` (then keeps the
    response positions). ``T`` is the sampling temperature: the log-probs must be those of
    the distribution the rollout sampled from. Computed as ``z[tok] - logsumexp(z)``,
    without materialising the ``[B, L, V]`` log-softmax.
    """
    z = logits / temperature if temperature != 1.0 else logits
    picked = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_per_token(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` per position: ``[..., V] ->
    [...]``. Keeps the gradient (for a bonus)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy (:func:`entropy_per_token`).

    ``logits`` ``[..., V]``; the mean is over ``mask`` (shaped like ``logits[..., 0]``) or,
    without one, over every position (logits of response tokens only, padding already
    dropped). Keeps the gradient (for a bonus).
    """
    entropy = entropy_per_token(logits)
    return entropy.mean() if mask is None else masked_mean(entropy, mask)


# --- reward: KL penalty, normalisation, shaping ------------------------------------------


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` on tokens sampled from ``pi``.

    * ``k1 = log p - log p_ref``: unbiased, can be negative per token.
    * ``k3 = (r - 1) - log r`` with ``r = p_ref / p = exp(log p_ref - log p)``: unbiased,
      always >= 0, lower variance (Schulman, "Approximating KL divergence", 2020).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r  # (r - 1) - log r, exact near r = 1
    raise ValueError(f"unknown KL estimator {estimator!r}: expected 'k1' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with ``m = 1`` in each row; -1 for an all-masked row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


def shaped_rewards(
    score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token reward ``r_t = -beta * kl_t + [t = last] * score`` (InstructGPT, eq. 2).

    ``score`` ``[B]`` is the (normalised) sequence reward, added at each row's last response
    token (found from ``mask``); padding gets 0, an all-masked row gets no score.
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += score[rows].to(rewards.dtype)
    return rewards


class RunningMoments:
    """Running mean and variance of every value seen, merged batch by batch.

    Chan et al. (1979) parallel update of Welford's algorithm: with ``(n_a, mean_a, M2_a)``
    so far and a batch ``(n_b, mean_b, M2_b)``, ``delta = mean_b - mean_a``,
    ``n = n_a + n_b``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``; ``var = M2 / n`` (population, ddof=0).
    Kept in float64.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def update(self, x: torch.Tensor) -> None:
        """Merge every entry of ``x`` into the moments."""
        x = x.detach().reshape(-1).to(torch.float64)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self._m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n

    def state(self) -> list[float]:
        """``[count, mean, M2]``: what a checkpoint keeps."""
        return [self.count, self.mean, self._m2]

    def load_state(self, state: list[float]) -> None:
        count, self.mean, self._m2 = state
        self.count = int(count)

    @property
    def var(self) -> float:
        return self._m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return self.var**0.5


def normalized_value_head(
    weight: torch.Tensor, bias: torch.Tensor, mean: float, std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A value head ``v = w·h + b`` that predicts raw reward scores, rescaled to predict them
    in normalised units ``(v - mean) / std``: ``(w / std, (b - mean) / std)``.

    A critic initialised from the reward model (InstructGPT C.4) predicts the reward model's
    raw score, while with ``normalize_reward`` the returns it must fit are normalised
    scores; unscaled, its first explained variance was about -7 on a learned reward (worse
    than a zero head). ``std`` at or below 1e-8 counts as 1, as in
    :func:`normalize_and_clip_rewards`.
    """
    sigma = nonzero_scale(std)
    return weight / sigma, (bias - mean) / sigma


def nonzero_scale(std: float) -> float:
    """The scale scores are divided by: ``std``, or 1 while it is still about 0 (one score
    seen)."""
    return std if std > 1e-8 else 1.0


def normalize_and_clip_rewards(
    scores: torch.Tensor,
    moments: RunningMoments,
    clip: float,
    shift_mean: bool = True,
    update: bool = True,
) -> torch.Tensor:
    """PPO-max reward normalisation and clipping (Zheng et al. 2023, section 5.3).

    ``clip((s - mu) / sigma, -c, c)`` with the running ``mu``, ``sigma`` of all scores seen,
    this batch included (``moments`` is updated first unless ``update=False``). Without
    ``shift_mean`` only the scale changes: ``clip(s / sigma, -c, c)``. While ``sigma`` is
    still 0 (one score seen) it counts as 1.
    """
    if update:
        moments.update(scores)
    sigma = nonzero_scale(moments.std)
    centred = scores - moments.mean if shift_mean else scores
    return (centred / sigma).clamp(-clip, clip)


# --- advantages -------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``;
    returns ``R_t = A_t + V_t`` (the critic's target). After a row's last response token
    ``V_{t+1} = A_{t+1} = 0`` (the episode ends: no bootstrap), which ``m_{t+1}`` enforces
    for right padding. Advantages and returns are 0 on padding; no gradient flows.
    """
    m = mask.to(values.dtype)
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = (advantages + values) * m
    return advantages, returns


# --- losses -----------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017): ``(loss, clip_fraction, approx_kl)``.

    ``ratio = exp(log p - log p_old)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.
    Where the clipped term wins (``A > 0, ratio > 1 + eps`` or ``A < 0, ratio < 1 - eps``)
    the token's gradient is 0.

    * ``clip_fraction``: share of response tokens with ``|ratio - 1| > eps`` (OpenAI
      baselines / CleanRL ``clipfrac``), detached.
    * ``approx_kl``: masked mean of ``k3 = (ratio - 1) - log ratio``, an unbiased,
      non-negative estimate of ``KL(pi_old || pi)`` on tokens sampled from ``pi_old``
      (Schulman 2020; CleanRL), detached. Used for the early stop of an epoch.
    """
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 baselines; PPO-max): ``(loss, clip_fraction)``.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``;
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.
    ``clip_fraction`` (detached): share of tokens where the clipped error is the larger.
    """
    keep = mask.bool()
    values = torch.where(keep, values, torch.zeros_like(values))
    old_values = torch.where(keep, old_values, torch.zeros_like(old_values))
    returns = torch.where(keep, returns, torch.zeros_like(returns))
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def ptx_loss(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PPO-ptx pretraining term (InstructGPT, eq. 2): ``-mean(log p(token))``.

    Plain next-token NLL on pretraining/SFT text; the same shift convention as
    :func:`logprobs_from_logits` (``logits[:, :-1]`` with ``tokens = input_ids[:, 1:]``).
    The mean is over ``mask`` or, without one, over every token given.
    """
    logprobs = logprobs_from_logits(logits, tokens)
    return -(logprobs.mean() if mask is None else masked_mean(logprobs, mask))


# --- gradient clipping ------------------------------------------------------------------


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to a global L2 norm of ``max_norm``, in place.

    ``n = sqrt(sum_p ||g_p||^2)`` over every parameter that has a gradient; if
    ``n > max_norm`` each gradient is multiplied by ``max_norm / (n + 1e-6)`` (so the new
    global norm is ``max_norm`` up to that epsilon), otherwise nothing changes. Returns
    ``n``, the norm *before* clipping (what is logged as ``grad_norm``; ``nan``/``inf`` when
    a gradient is not finite, which the caller must check before stepping). This is
    ``torch.nn.utils.clip_grad_norm_`` (PPO2 baselines, CleanRL), named here so the
    trainer's clipping is the function the tests check.
    """
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


# --- KL coefficient controllers ----------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / H)``:
    ``beta`` grows when the policy drifts past the target and shrinks below it, by at most
    ``0.2 * n_steps / H`` per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient (InstructGPT; PPO-max): ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps
