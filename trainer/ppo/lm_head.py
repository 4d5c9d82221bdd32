"""Log-probs and entropy of chosen tokens through a frozen LM head, without ``[N, V]`` logits.

PPO needs, per response token, ``log softmax(h W^T / T)[token]`` (and the entropy, for
logging or a bonus). Computed the plain way, the logits of every response token of a
micro-batch, ``[N, V]`` in float32, are kept for the backward: 4 bytes times the
vocabulary per token (192 KB for 49,152 entries, 500 KB for 128 K), besides the head's
weight cast for the product and the ``[N, V]`` gradient the backward makes.

Here the head runs over ``chunk`` rows at a time, and each chunk's logits are dropped as
soon as its numbers are taken. With a gradient, the forward computes each chunk's
derivative of the log-prob (and, for an entropy bonus, of the entropy) with respect to the
hidden state at once, ``[N, H]`` (for a frozen head the backward needs nothing else):

* ``d logp / d z = onehot(token) - p``, ``p = softmax(z)``;
* ``d H / d z = -p * (log p + H)``, ``H = -sum(p log p)``;
* ``d / d h = (d / d z) W / T`` (``z = h W^T / T``).

The backward is then one scale and add per token. The product with ``W`` moves from the
backward into the forward: the same products as before, in the same precision (``dtype``:
the autocast dtype of the pass, the head's weight given already cast), and none of the
logits kept. This is what Liger-Kernel's fused linear cross-entropy does on GPUs. A head
that trains (a gradient for ``W``) is not handled here: the caller keeps the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 22
"""Logits per chunk (4 M float32 values, 16 MB): 85 rows of a 49,152 vocabulary."""


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab`` (at least one)."""
    return max(1, CHUNK_LOGITS // vocab)


def _scaled_logits(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """``h W^T / T`` in float32, the product in ``dtype`` (None: ``hidden``'s)."""
    h = hidden if dtype is None else hidden.to(dtype)
    z = F.linear(h, weight).float()
    return z / temperature if temperature != 1.0 else z


def _picked(z: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(token) [c], logsumexp(z) [c])`` by the very operations of
    :func:`~trainer.ppo.core.logprobs_from_logits` on the whole logits: the same numbers,
    bit for bit (the frozen reference must stay the base model's exactly)."""
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, lse


def _distribution(
    z: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy [c], p [c, V], log p [c, V])`` from the scaled logits, which become
    ``log p`` (in place: a chunk's logits are not needed after)."""
    logp = z.sub_(lse.unsqueeze(-1))
    p = logp.exp()
    return -(p * logp).sum(-1), p, logp


class _HeadLogprobs(torch.autograd.Function):
    """``(logprobs [N], entropy [N])`` of ``tokens`` under ``hidden [N, H] @ weight^T / T``,
    with the gradient for ``hidden`` only (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        dtype: torch.dtype | None,
        entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32)
        d_logprobs = hidden.new_empty(hidden.shape, dtype=torch.float32)
        d_entropy = hidden.new_empty(hidden.shape, dtype=torch.float32) if entropy_grad else None
        product_dtype = dtype or weight.dtype
        step = chunk_rows(weight.shape[0])
        for start in range(0, n, step):
            rows = slice(start, start + step)
            picked = tokens[rows]
            z = _scaled_logits(hidden[rows], weight, temperature, dtype)
            logprobs[rows], lse = _picked(z, picked)
            ent, p, logp = _distribution(z, lse)
            entropy[rows] = ent
            dz = p.neg_()  # d logp / d z = onehot - p, written over p
            dz.scatter_add_(-1, picked.unsqueeze(-1), dz.new_ones(len(picked), 1))
            d_logprobs[rows] = (dz.to(product_dtype) @ weight).float() / temperature
            if d_entropy is not None:
                # -p * (log p + H), p again from log p (its tensor now holds d logp / d z)
                dh = logp.exp().mul_(logp.add_(ent.unsqueeze(-1))).neg_()
                d_entropy[rows] = (dh.to(product_dtype) @ weight).float() / temperature
        ctx.save_for_backward(d_logprobs, d_entropy)
        ctx.hidden_dtype = hidden.dtype
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        d_logprobs, d_entropy = ctx.saved_tensors
        grad = d_logprobs * grad_logprobs.unsqueeze(-1)
        if d_entropy is not None and grad_entropy is not None:
            grad = grad + d_entropy * grad_entropy.unsqueeze(-1)
        return grad.to(ctx.hidden_dtype), None, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    dtype: torch.dtype | None = None,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of ``hidden [N, H]``: the log-prob of ``tokens [N]`` under the frozen head
    ``weight [V, H]`` (no bias) at ``temperature``, and the distribution's entropy (None
    without ``with_entropy``: a no-gradient pass then takes nothing but the log-prob);
    ``[N]`` each, float32. ``dtype``: the products' dtype (``weight`` must already be in
    it), None = ``hidden``'s. A gradient flows to ``hidden`` when it requires one, through
    the entropy only with ``entropy_grad``; never to ``weight``."""
    if weight.requires_grad:
        raise ValueError("head_logprobs is for a frozen head: the weight takes no gradient")
    if torch.is_grad_enabled() and hidden.requires_grad:
        out = _HeadLogprobs.apply(hidden, weight, tokens, temperature, dtype, entropy_grad)
        return out[0], out[1] if with_entropy else None
    logprobs, entropies = [], []
    step = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        z = _scaled_logits(hidden[start : start + step], weight, temperature, dtype)
        lp, lse = _picked(z, tokens[start : start + step])
        logprobs.append(lp)
        if with_entropy:
            entropies.append(_distribution(z, lse)[0])
    if not logprobs:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty if with_entropy else None
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None
