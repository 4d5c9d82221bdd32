"""One PPO iteration, in the order it happens (the math is in :mod:`trainer.ppo.core`).

:meth:`PPOTrainer.iteration` takes a batch of prompts (conversations) and:

1. **rollout** - syncs the actor into the sampler (vLLM: write the adapter, load it) and
   samples one response per prompt at ``temperature``;
2. **evaluate the rollout** (no gradient) - recomputes the actor's log-probs with the
   training model (never another engine's: their mean absolute gap is logged; a sampler
   that is the training model in float32 hands over its own, and a shared critic's values
   with them: ``recompute_logprobs``; in another precision it hands them over for every
   row but the update's first mini-batch, whose recomputed ones measure the gap, and the
   rest are recomputed only where that gap is too large), the frozen reference's
   log-probs (adapters disabled), the critic's values, and the reward: reward model score
   plus rule terms, one number per response. With vLLM this overlaps step 1:
   the sampler streams finished responses, and once two micro-batches of them are ready
   they are scored, up to a mini-batch a pass, while the engine (its own processes, on its
   own cores) still generates the longer ones; the ``hf`` decode loop hands over the whole
   batch at once. Every row's numbers are its own, whichever pass it landed in;
3. **reward shaping** - scores normalised by running statistics (``normalize_reward``)
   and clipped (PPO-max), per-token KL penalty ``-beta * kl`` with the score added on the
   last token;
4. **advantages** - GAE over response tokens, then whitened (``whiten_advantages``);
5. **update** - ``ppo_epochs`` passes of shuffled mini-batches: clipped surrogate +
   ``vf_coef`` * clipped value loss - ``entropy_coef`` * entropy (+ PPO-ptx), global
   gradient-norm clip, AdamW step; the epoch loop stops early once the approximate KL to
   the rollout policy passes ``approx_kl_stop``. During critic warm-up only the critic learns;
6. **KL controller** - ``beta`` moves toward the target (adaptive) or stays (fixed).

It returns the iteration's metrics. Non-finite scores, losses or gradients raise
:class:`TrainingDiverged` before any optimizer step applies them. :meth:`state_dict` /
:meth:`load_state_dict` hold everything a resumed round needs (adapters, head, optimizer,
KL coefficient, reward statistics). Under torchrun each rank runs this on its shard of the
prompts (see :mod:`trainer.common.distributed`). Every tensor it builds is on the models'
device (:meth:`~trainer.ppo.models.PolicyModels.to`); the reward function's come back on the
CPU and are moved there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from trainer.common.activation_checkpointing import checkpoint_layers
from trainer.common.distributed import Dist
from trainer.common.jemalloc import release_freed_pages
from trainer.ppo import core as pm
from trainer.ppo.config import PPOConfig
from trainer.ppo.models import POLICY, PolicyModels, TokenBatch
from trainer.ppo.rollout.base import Finished, Sampler, render_prompts

RewardFn = Callable[[Sequence[Any], Sequence[str]], dict[str, torch.Tensor]]
"""``(conversations, answers) -> {"total": [B], <component>: [B], ...}`` (ComposedReward)."""


@dataclass
class ScoredRollout:
    """Step 1 and 2's result, rows in prompt order; ``[B, R]`` tensors are 0 on padding."""

    batch: TokenBatch
    old_logprobs: torch.Tensor
    values: torch.Tensor
    ref_logprobs: torch.Tensor
    sampler_logprobs: torch.Tensor
    reward_parts: dict[str, torch.Tensor]
    tokens: int
    rollout_s: float
    """From the first request to the last response."""
    score_s: float
    """Time spent scoring (with vLLM, most of it while the engine was still generating)."""


@dataclass
class FirstForward:
    """The update's first micro-batch, run before the advantages exist
    (:meth:`PPOTrainer._first_forward`): its rows in the order the update takes them and
    the actor-critic's outputs, graph attached, for the update's first backward."""

    rows: torch.Tensor
    outputs: tuple[Any, ...]
    """``(logprobs, values, entropy, ptx_nll)``, as :class:`~trainer.ppo.models.ActorCritic`
    returns them."""


class TrainingDiverged(RuntimeError):
    """NaN/inf in scores, losses or gradients: the round must abort, not register."""


def _finite(name: str, value: torch.Tensor, iteration: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise TrainingDiverged(f"non-finite {name} at iteration {iteration}")


def _put(target: torch.Tensor, rows: torch.Tensor, chunk: TokenBatch, part: torch.Tensor) -> None:
    """Write ``part`` ``[b, R']``, per-token numbers of ``chunk`` (the rows ``rows`` of a
    batch, cut to its own width), into those rows of ``target`` ``[B, R]``, 0 on padding."""
    keep = chunk.mask.bool()
    target[rows, : chunk.response_width] = torch.where(keep, part, torch.zeros_like(part))


def _padded(
    rows: Sequence[Sequence[float]], width: int, device: torch.device | None = None
) -> torch.Tensor:
    """``rows`` right-padded with 0 to ``width``, laid out on the CPU, then on ``device``."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        values = list(row)[:width]
        if values:
            out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out if device is None else out.to(device)


def _complement(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The indices of ``range(n)`` not in ``rows``, ascending."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero()[:, 0]


def _flags(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` booleans, True at ``rows``."""
    flags = torch.zeros(n, dtype=torch.bool)
    flags[rows] = True
    return flags


class PPOTrainer:
    """Runs PPO iterations on :class:`PolicyModels` (see module docstring)."""

    def __init__(
        self,
        config: PPOConfig,
        models: PolicyModels,
        sampler: Sampler,
        reward_fn: RewardFn,
        dist: Dist | None = None,
        ptx_examples: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
    ) -> None:
        """``ptx_examples``: (prompt ids, answer ids) of SFT text for PPO-ptx (used only when
        ``config.ptx_coef > 0``; one mini-batch of them per gradient step)."""
        self.config = config
        self.models = models
        self.sampler = sampler
        self.reward_fn = reward_fn
        self.dist = dist or Dist()
        if config.rollout_batch_size % self.dist.world_size or (
            config.mini_batch_size % self.dist.world_size
        ):
            raise ValueError("rollout_batch_size and mini_batch_size must divide by world size")
        self.kl_controller = config.kl_controller()
        self.moments = pm.RunningMoments()
        self.optimizer = torch.optim.AdamW(
            models.param_groups(config.actor_lr, config.critic_lr), weight_decay=0.0
        )
        self.device = models.device
        """Where every tensor of an iteration lives: the models' device."""
        if config.activation_checkpointing:
            checkpoint_layers(models.peft_model, config.checkpoint_every, models.replaying_adapter)
        models.shared_prefix_min_tokens = config.shared_prefix_min_tokens
        self.module: torch.nn.Module = models.actor_critic
        if self.dist.enabled:
            self.module = DistributedDataParallel(
                models.actor_critic, device_ids=self.dist.device_ids, find_unused_parameters=True
            )
        tokenizer = models.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.may_take_sampler_logprobs = (
            config.recompute_logprobs == "auto" and sampler.is_training_model
        )
        """The sampler is the training model: its log-probs (and values) are the actor's up
        to rounding."""
        self.takes_sampler_logprobs = (
            self.may_take_sampler_logprobs and models.autocast_dtype is None
        )
        """Scoring a rollout runs the reference (and an adapter critic) only: in float32 from
        the start; under autocast once an iteration measured the gap below
        ``config.sampler_logprob_tolerance``."""
        self.sampler_gap_measured = False
        """Whether an iteration has measured the sampler's log-prob gap (under
        ``may_take_sampler_logprobs``), deciding ``takes_sampler_logprobs``."""
        self.ptx_examples = list(ptx_examples) if config.ptx_coef > 0 else []
        if config.ptx_coef > 0 and not self.ptx_examples:
            raise ValueError("ptx_coef > 0 needs ptx_examples (SFT prompt/answer token ids)")

    @property
    def measuring_sampler_gap(self) -> bool:
        """Whether the next iteration measures the sampler's log-prob gap to decide whether
        to take them (``recompute_logprobs`` "auto" with the training model as sampler, in
        a precision where they were not trusted from the start): the first iteration
        only."""
        return (
            self.may_take_sampler_logprobs
            and not self.takes_sampler_logprobs
            and not self.sampler_gap_measured
        )

    # --- checkpoint state --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainable": self.models.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "kl_coef": self.kl_controller.value,
            "moments": self.moments.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.value = float(state["kl_coef"])
        self.moments.load_state(state["moments"])

    # --- one iteration -------------------------------------------------------------------------

    @torch.no_grad()
    def _value_head_to_normalized_units(
        self, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Once, at a round's first rollout: a critic that starts as the reward model
        predicts raw scores; rescale its head (and this rollout's values) to the normalised
        scores its returns are made of (:func:`trainer.ppo.core.normalized_value_head`)."""
        head = self.models.value_head
        weight, bias = pm.normalized_value_head(
            head.weight, head.bias, self.moments.mean, self.moments.std
        )
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        sigma = pm.nonzero_scale(self.moments.std)
        return ((values - self.moments.mean) / sigma) * mask

    def _lr_factor(self, iteration: int) -> float:
        warmup = self.config.lr_warmup_iterations
        return 1.0 if warmup == 0 else 0.1 + 0.9 * min(1.0, iteration / warmup)

    def _shuffle_generator(self, iteration: int) -> torch.Generator:
        """The generator that draws iteration ``iteration``'s mini-batches."""
        return torch.Generator().manual_seed(self.config.seed * 7_919 + iteration)

    def _micro_batches(self, batch: TokenBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """The mini-batch ``rows`` sorted by length (stable) and cut into micro-batches."""
        rows = rows.to(batch.device)  # drawn on the CPU (a seeded generator there)
        lengths = batch.attention_mask[rows].sum(1)
        rows = rows[torch.argsort(lengths, stable=True)]
        return list(rows.split(self.config.micro_batch_size))

    def _first_draw(self, rows: int, iteration: int) -> torch.Tensor:
        """The rows (of ``rows`` rollout rows) of the update's first mini-batch, drawn as
        :meth:`_update` will draw them."""
        mini = self.config.mini_batch_size // self.dist.world_size
        return torch.randperm(rows, generator=self._shuffle_generator(iteration))[:mini]

    def _first_mini_batch(self, rows: int, iteration: int) -> torch.Tensor | None:
        """The rows of the update's first mini-batch (:meth:`_first_draw`) where its own
        forward can stand in for their actor pass in scoring
        (``PPOConfig.first_mini_batch_from_update``: the pass runs at all, the mini-batch is
        one micro-batch, one process, no PPO-ptx); else None. Not in the iteration that
        measures the sampler's gap: it scores those rows before the update, so that where
        the gap is too large the other rows' actor pass runs while no graph is held (a
        folded copy of the weights on top of the first forward's activations would raise
        the peak)."""
        cfg = self.config
        mini = cfg.mini_batch_size // self.dist.world_size
        if (
            not cfg.first_mini_batch_from_update
            or self.takes_sampler_logprobs
            or self.measuring_sampler_gap
            or mini > cfg.micro_batch_size
            or self.dist.enabled
            or self.ptx_examples
        ):
            return None
        return self._first_draw(rows, iteration)

    def _first_forward(
        self,
        batch: TokenBatch,
        rows: torch.Tensor,
        old_logprobs: torch.Tensor,
        values: torch.Tensor,
    ) -> FirstForward:
        """The update's first forward, on the mini-batch ``rows``, before any optimizer step:
        its log-probs and values (detached, 0 on padding) written into ``old_logprobs`` and
        ``values``, in place of the scoring pass those rows skipped; its outputs kept, graph
        and all, for :meth:`_accumulate` to take its loss from."""
        (piece,) = self._micro_batches(batch, rows)  # one micro-batch (_first_mini_batch)
        mb = batch.select(piece)
        outputs = self.module(mb, None, entropy_grad=self.config.entropy_coef > 0)
        _put(old_logprobs, piece, mb, outputs[0].detach())
        _put(values, piece, mb, outputs[1].detach())
        return FirstForward(piece, tuple(outputs))

    # Long on purpose: the PPO steps in the order they happen, read top to bottom as in
    # CleanRL's ppo.py; every step's math is a small pure function in trainer.ppo.core.
    def iteration(self, conversations: Sequence[Any], iteration: int) -> dict[str, Any]:
        """One PPO iteration on this rank's ``conversations``; returns its metrics."""
        cfg, dist, models = self.config, self.dist, self.models
        started = time.perf_counter()
        shared_before = models.prefix_tokens_shared

        # 1+2. rollout, and evaluate it as it streams in: actor and critic (this very model),
        #      reference, reward. The last update's freed pages go back to the system
        #      first: the decode's KV cache and folded weights would sit on top of them.
        release_freed_pages()
        sync_s = self.sampler.sync(models, str(iteration))
        seed = (cfg.seed * 1_000_003 + iteration) * dist.world_size + dist.rank
        n = len(conversations)
        first_rows = self._first_mini_batch(n, iteration)
        # The first iteration under recompute_logprobs "auto" in another precision runs the
        # actor on the update's first mini-batch only, and measures the sampler's gap there:
        # within the tolerance the other rows keep the sampler's numbers, and so do all rows
        # from then on; past it the other rows get their actor pass now.
        measured = self._first_draw(n, iteration) if self.measuring_sampler_gap else None
        taken = None if measured is None else _complement(measured, n)
        rollout = self._rollout_and_score(conversations, seed, first_rows, taken)
        t_score = time.perf_counter()
        batch, old_logprobs, values = rollout.batch, rollout.old_logprobs, rollout.values
        mask = batch.mask.float()
        gap = None
        if taken is not None:  # the same mean on every rank: the ranks decide alike
            gap = dist.mean(
                self._sampler_gap(old_logprobs, rollout.sampler_logprobs, mask, measured)
            )
            self.takes_sampler_logprobs = gap < cfg.sampler_logprob_tolerance
            self.sampler_gap_measured = True
            if not self.takes_sampler_logprobs:
                self._actor_pass(batch, _flags(taken, n), old_logprobs, values)
        scores = rollout.reward_parts["total"].float()
        _finite("reward scores", scores, iteration)

        # 3. reward: normalise + clip the scores (stats over every rank), per-token KL penalty.
        first_look = self.moments.count == 0
        self.moments.update(dist.gather(scores))
        if first_look and cfg.normalize_reward and models.critic_from_reward:
            values = self._value_head_to_normalized_units(values, mask)
        # The update's first forward, made now (after the critic head's rescale, if any):
        # the actor's numbers of the rows scoring left out
        # (PPOConfig.first_mini_batch_from_update). Timed as the update's.
        first, first_s = None, 0.0
        if first_rows is not None:
            t_first = time.perf_counter()
            first = self._first_forward(batch, first_rows, old_logprobs, values)
            first_s = time.perf_counter() - t_first
        if taken is None and not self.takes_sampler_logprobs:  # logged: see module docstring
            gap = dist.mean(self._sampler_gap(old_logprobs, rollout.sampler_logprobs, mask, None))
        if cfg.normalize_reward:
            norm_scores = pm.normalize_and_clip_rewards(
                scores, self.moments, cfg.reward_clip, update=False
            )
        else:
            norm_scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        kl = pm.kl_penalty(old_logprobs, rollout.ref_logprobs, cfg.kl_estimator)
        beta = self.kl_controller.value
        rewards = pm.shaped_rewards(norm_scores, kl, beta, mask)

        # 4. advantages: GAE over response tokens, whitened.
        advantages, returns = pm.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask)
        score_s = rollout.score_s + time.perf_counter() - t_score - first_s

        # 5. update: epochs of shuffled mini-batches, early stop on approximate KL.
        t_update = time.perf_counter()
        update = self._update(batch, old_logprobs, values, advantages, returns, iteration, first)
        update_s = time.perf_counter() - t_update + first_s

        # 6. KL controller, on the mean per-sequence KL to the reference.
        token_kl = torch.where(batch.mask.bool(), kl, torch.zeros_like(kl))  # not on padding
        seq_kl = dist.mean(token_kl.sum(-1).mean().item())
        self.kl_controller.update(seq_kl, cfg.rollout_batch_size)

        lengths = batch.mask.sum(-1).float()
        metrics: dict[str, Any] = {
            "iteration": iteration,
            "reward_raw": dist.mean(scores.mean().item()),
            "reward_normalized": dist.mean(norm_scores.mean().item()),
            "kl_ref": seq_kl,
            "kl_coef": beta,
            "next_kl_coef": self.kl_controller.value,
            "explained_variance": dist.mean(pm.explained_variance(values, returns, mask)),
            "response_length": dist.mean(lengths.mean().item()),
            "rows_scored_by_update": 0 if first is None else len(first.rows),
            "prefix_tokens_shared": models.prefix_tokens_shared - shared_before,
            # None where the sampler's own log-probs were taken: there is no gap to measure.
            "sampler_logprob_gap": gap,
            "episodes": cfg.rollout_batch_size,
            "rollout_tokens": int(dist.mean(float(rollout.tokens)) * dist.world_size),
            "rollout_tokens_per_s": dist.mean(rollout.tokens / max(rollout.rollout_s, 1e-9))
            * dist.world_size,
            "sync_s": sync_s,
            "rollout_s": rollout.rollout_s,
            "score_s": score_s,
            "update_s": update_s,
            **update,
        }
        for name, values_ in rollout.reward_parts.items():
            if name != "total":
                metrics[f"reward_{name}"] = dist.mean(values_.float().mean().item())
        metrics["seconds"] = time.perf_counter() - started
        metrics["episodes_per_s"] = cfg.rollout_batch_size / metrics["seconds"]
        return metrics

    # Long on purpose: one loop that interleaves taking finished answers from the stream
    # with scoring them; split, its shared buffers would travel through every piece.
    def _rollout_and_score(
        self,
        conversations: Sequence[Any],
        seed: int,
        by_update: torch.Tensor | None = None,
        taken: torch.Tensor | None = None,
    ) -> ScoredRollout:
        """Sample one response per conversation and score the responses as soon as the
        sampler has finished them: once ``2 * micro_batch_size`` are ready (no gradient:
        no activations kept, so twice the rows of a training micro-batch), all that are
        ready, up to ``mini_batch_size`` per pass; once the stream ends, the rest in one
        call, whose passes chunk it (the adapter folded once for all of them). The rows
        ``by_update`` get no actor pass here (0 for their log-probs and values): the
        update's first forward computes them (:meth:`_first_forward`). The rows ``taken``
        (default: every row where :attr:`takes_sampler_logprobs`, else none) get the
        sampler's log-probs, and the values it read where it has them, instead of an actor
        pass."""
        models, cfg = self.models, self.config
        prompt_ids = render_prompts(models.tokenizer, conversations)
        n = len(prompt_ids)
        responses: list[list[int]] = [[] for _ in range(n)]
        sampler_logprobs: list[list[float]] = [[] for _ in range(n)]
        scored: dict[int, tuple[torch.Tensor, ...]] = {}  # row -> (logprobs, values, ref)
        parts: dict[str, torch.Tensor] = {}
        score_s = 0.0
        skipped = set() if by_update is None else set(by_update.tolist())
        from_sampler = set(range(n)) if self.takes_sampler_logprobs else set()
        if taken is not None:
            from_sampler = set(taken.tolist())

        def score(chunk: list[Finished]) -> None:
            nonlocal score_s
            t = time.perf_counter()
            rows = [d.index for d in chunk]
            sub = TokenBatch.build(
                [prompt_ids[i] for i in rows],
                [d.response_ids for d in chunk],
                self.pad_id,
                self.device,
            )
            per_token = self._score_tokens(
                sub,
                chunk,
                skip_actor=[d.index in skipped for d in chunk],
                take_sampler=[d.index in from_sampler for d in chunk],
            )
            for j, d in enumerate(chunk):
                length = len(d.response_ids)
                scored[d.index] = tuple(part[j, :length] for part in per_token)
            answers = models.tokenizer.batch_decode(
                [d.response_ids for d in chunk], skip_special_tokens=True
            )
            with torch.inference_mode():
                chunk_parts = self.reward_fn([conversations[i] for i in rows], answers)
            for name, value in chunk_parts.items():
                total = parts.setdefault(
                    name, torch.zeros(n, dtype=value.dtype, device=self.device)
                )
                total[rows] = value.to(self.device)
            score_s += time.perf_counter() - t

        ready: list[Finished] = []

        def score_ready(at_least: int) -> None:
            """Score the finished rows, at most a mini-batch per pass (bigger no-gradient
            passes run faster), while at least ``at_least`` of them wait."""
            nonlocal ready
            while ready and len(ready) >= at_least:
                score(ready[: cfg.mini_batch_size])
                ready = ready[cfg.mini_batch_size :]

        started = last = time.perf_counter()
        stream = self.sampler.stream(
            prompt_ids,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
        )
        for finished in stream:
            last = time.perf_counter()
            for done in finished:
                responses[done.index] = done.response_ids
                sampler_logprobs[done.index] = done.sampler_logprobs
            ready += finished
            score_ready(at_least=2 * cfg.micro_batch_size)
        rollout_s = last - started
        if ready:  # the rest in one call: its passes chunk it, each weight folded once
            score(ready)
        if len(scored) != n:
            raise RuntimeError(f"the sampler answered {len(scored)} of {n} prompts")

        batch = TokenBatch.build(prompt_ids, responses, self.pad_id, self.device)
        old_logprobs, values, ref_logprobs = (
            torch.zeros(batch.mask.shape, device=self.device) for _ in range(3)
        )
        for i, row in scored.items():
            for target, row_values in zip((old_logprobs, values, ref_logprobs), row, strict=True):
                target[i, : row_values.shape[0]] = row_values
        return ScoredRollout(
            batch,
            old_logprobs,
            values,
            ref_logprobs,
            sampler_logprobs=_padded(sampler_logprobs, batch.response_width, self.device),
            reward_parts=parts,
            tokens=sum(len(r) for r in responses),
            rollout_s=rollout_s,
            score_s=score_s,
        )

    @torch.inference_mode()
    def _score_tokens(
        self,
        batch: TokenBatch,
        finished: Sequence[Finished] | None = None,
        skip_actor: Sequence[bool] | None = None,
        take_sampler: Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Actor log-probs, critic values and reference log-probs ``[B, R]`` of the rollout
        rows ``finished`` (laid out in ``batch``), computed in length-sorted chunks (less
        padding; every row's numbers are its own), 0 on padding. Rows flagged in
        ``take_sampler`` (default: all where :attr:`takes_sampler_logprobs`; none where
        ``finished`` is None, then every number is computed) get the sampler's log-probs,
        and the values it read when it has them, instead of recomputed ones. Rows flagged
        in ``skip_actor`` get the reference only (0 for the actor's log-probs and values:
        the update computes them)."""
        n = len(batch)
        out = [torch.zeros(batch.mask.shape, device=batch.device) for _ in range(3)]
        take = torch.tensor(
            [self.takes_sampler_logprobs] * n if take_sampler is None else list(take_sampler),
            dtype=torch.bool,
        )
        skip = torch.tensor([False] * n if skip_actor is None else list(skip_actor))
        if finished is None:
            take[:] = False
        critic_only = torch.zeros(n, dtype=torch.bool)
        if finished is not None and bool(take.any()):
            width, here = batch.response_width, take.to(batch.device)
            taken_logprobs = _padded([d.sampler_logprobs for d in finished], width, batch.device)
            out[0][here] = taken_logprobs[here]
            if all(d.values is not None for d in finished):
                taken_values = _padded([d.values or [] for d in finished], width, batch.device)
                out[1][here] = taken_values[here]
            else:
                critic_only = take & ~skip
        self._actor_pass(batch, ~take & ~skip, out[0], out[1], critic_only)
        with self.models.reference():
            for rows in batch.length_chunks(self.config.mini_batch_size):
                chunk = batch.select(rows)
                _put(out[2], rows, chunk, self.models.reference_logprobs(chunk))
        return tuple(out)

    @torch.inference_mode()
    def _actor_pass(
        self,
        batch: TokenBatch,
        actor: torch.Tensor,
        logprobs: torch.Tensor,
        values: torch.Tensor,
        critic_only: torch.Tensor | None = None,
    ) -> None:
        """The actor's log-probs and the critic's values of the rows of ``batch`` flagged
        in ``actor`` (``[B]`` booleans), and the critic's values alone of those flagged in
        ``critic_only``, written into ``logprobs`` and ``values`` ``[B, R]``; length-sorted
        chunks of at most a mini-batch. The adapter is folded once for every chunk (a pass
        over every weight), not once per chunk; a critic adapter of its own is folded in
        turn, chunk by chunk."""
        critic_only = torch.zeros_like(actor) if critic_only is None else critic_only
        if not bool((actor | critic_only).any()):
            return
        ac = self.models.actor_critic
        once = ac.critic_kind == "shared"
        with self.models.adapter(POLICY) if once else contextlib.nullcontext():
            for rows in batch.length_chunks(self.config.mini_batch_size):
                for wanted, alone in ((actor[rows.cpu()], False), (critic_only[rows.cpu()], True)):
                    kept = rows[wanted.to(rows.device)]
                    if not len(kept):
                        continue
                    chunk = batch.select(kept)
                    if alone:
                        _put(values, kept, chunk, ac.critic(chunk))
                        continue
                    chunk_logprobs, chunk_values, _ = ac.evaluate(chunk, with_entropy=False)
                    _put(logprobs, kept, chunk, chunk_logprobs)
                    _put(values, kept, chunk, chunk_values)

    def _sampler_gap(
        self,
        logprobs: torch.Tensor,
        sampler_logprobs: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor | None,
    ) -> float:
        """The mean absolute gap per response token between the actor's log-probs and the
        sampler's, over ``rows`` (None: every row)."""
        gap = (logprobs - sampler_logprobs).abs()
        if rows is not None:
            rows = rows.to(gap.device)
            gap, mask = gap[rows], mask[rows]
        return pm.masked_mean(gap, mask).item()

    # Long on purpose: one micro-batch's forward, the three losses and their metrics, in
    # the order the gradient is built (the loss terms are pure functions in core).
    def _accumulate(
        self,
        batch: TokenBatch,
        rows: torch.Tensor,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        ptx: TokenBatch | None,
        iteration: int,
        first: FirstForward | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backward the mini-batch ``rows``'s loss, micro-batch by micro-batch, and return
        its (detached) loss terms and statistics.

        The rows are sorted by length and cut into ``micro_batch_size`` pieces, each padded
        only to its own longest row. Every loss term is a masked mean over response tokens;
        a micro-batch's mean is weighted by its share of the mini-batch's tokens, so the
        summed gradient is the mini-batch's own. (PPO-ptx rides on the first micro-batch.)
        ``first``: this mini-batch's forward, already made (:meth:`_first_forward`).
        """
        cfg = self.config
        warming_up = iteration < cfg.critic_warmup_iterations
        pieces = self._micro_batches(batch, rows)
        if first is not None and not torch.equal(pieces[0], first.rows):
            raise RuntimeError("the first forward was made on other rows than the update's")
        rows = torch.cat(pieces)
        total_tokens = float(batch.mask[rows].sum().clamp(min=1))
        sums: dict[str, torch.Tensor] = {}
        for k, piece in enumerate(pieces):
            mb = batch.select(piece)
            mb_mask = mb.mask.float()
            width = mb.response_width
            share = float(mb_mask.sum()) / total_tokens
            last = k == len(pieces) - 1
            # DDP all-reduces the gradients once, after the last micro-batch's backward.
            ddp = self.module if isinstance(self.module, DistributedDataParallel) else None
            no_sync = ddp.no_sync() if ddp is not None and not last else None
            with no_sync or contextlib.nullcontext():
                if k == 0 and first is not None:
                    logprobs, values, entropy, ptx_nll = first.outputs
                else:
                    logprobs, values, entropy, ptx_nll = self.module(
                        mb, ptx if k == 0 else None, entropy_grad=cfg.entropy_coef > 0
                    )
                p_loss, clip_frac, approx_kl = pm.policy_loss(
                    logprobs,
                    old_logprobs[piece, :width],
                    advantages[piece, :width],
                    mb_mask,
                    cfg.clip_range,
                )
                v_loss, v_clip = pm.value_loss(
                    values,
                    old_values[piece, :width],
                    returns[piece, :width],
                    mb_mask,
                    cfg.value_clip_range,
                )
                if warming_up:  # critic only; the actor's graph stays in (DDP) at zero weight
                    loss = cfg.vf_coef * v_loss + 0.0 * (p_loss + entropy)
                else:
                    loss = p_loss + cfg.vf_coef * v_loss - cfg.entropy_coef * entropy
                loss = share * loss
                if ptx_nll is not None:  # PPO-ptx: keep the SFT likelihood up
                    loss = loss + cfg.ptx_coef * ptx_nll
                    sums["ptx_loss"] = ptx_nll.detach()
                _finite("loss", loss, iteration)
                loss.backward()
            for key, value in (
                ("policy_loss", p_loss),
                ("value_loss", v_loss),
                ("entropy", entropy),
                ("clip_fraction", clip_frac),
                ("value_clip_fraction", v_clip),
                ("approx_kl", approx_kl),
            ):
                sums[key] = sums.get(key, 0.0) + share * value.detach()
        return sums

    def _ptx_batch(self, generator: torch.Generator) -> TokenBatch | None:
        if not self.ptx_examples:
            return None
        n = min(len(self.ptx_examples), self.config.mini_batch_size // self.dist.world_size)
        rows = torch.randperm(len(self.ptx_examples), generator=generator)[:n].tolist()
        prompts = [self.ptx_examples[i][0] for i in rows]
        answers = [self.ptx_examples[i][1] for i in rows]
        return TokenBatch.build(prompts, answers, self.pad_id, self.device)

    # Long on purpose: epochs of shuffled mini-batches, gradient accumulation, clipping and
    # the approximate-KL early stop, one PPO update in the order it happens.
    def _update(
        self,
        batch: TokenBatch,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        iteration: int,
        first: FirstForward | None = None,
    ) -> dict[str, Any]:
        """Epochs of shuffled mini-batches; ``first``: the first one's forward, already
        made (:meth:`_first_forward`)."""
        cfg, dist = self.config, self.dist
        warming_up = iteration < cfg.critic_warmup_iterations
        factor = self._lr_factor(iteration)
        for group in self.optimizer.param_groups:
            peak = cfg.actor_lr if group["name"] == "actor" else cfg.critic_lr
            group["lr"] = 0.0 if (warming_up and group["name"] == "actor") else peak * factor
        local_batch = len(batch)
        local_mini = cfg.mini_batch_size // dist.world_size
        params = self.models.trainable_parameters()
        logs: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "entropy",
                "clip_fraction",
                "value_clip_fraction",
                "approx_kl",
                "grad_norm",
                "ptx_loss",
            )
        }
        epochs_done, early_stopped = 0, False
        generator = self._shuffle_generator(iteration)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(local_batch, generator=generator)
            for start in range(0, local_batch, local_mini):
                rows = order[start : start + local_mini]
                ptx = self._ptx_batch(generator)
                self.optimizer.zero_grad(set_to_none=True)
                step = self._accumulate(
                    batch,
                    rows,
                    old_logprobs,
                    old_values,
                    advantages,
                    returns,
                    ptx,
                    iteration,
                    first,
                )
                first = None  # its graph is spent
                grad_norm = pm.clip_grad_norm(params, cfg.max_grad_norm)
                _finite("gradient norm", grad_norm, iteration)
                self.optimizer.step()
                step["grad_norm"] = grad_norm
                for key, value in step.items():
                    logs[key].append(float(value))
                # Early stop when the policy moved too far from the one that sampled.
                approx_kl = float(step["approx_kl"])
                too_far = cfg.approx_kl_stop > 0 and approx_kl > cfg.approx_kl_stop
                if dist.any(too_far and not warming_up):
                    early_stopped = True
                    break
            epochs_done += 1
            if early_stopped:
                break
        out: dict[str, Any] = {
            k: dist.mean(sum(v) / len(v)) if v else None for k, v in logs.items()
        }
        out.update(
            epochs=epochs_done,
            early_stopped=early_stopped,
            critic_warmup=warming_up,
            gradient_steps=len(logs["policy_loss"]),
        )
        return out
