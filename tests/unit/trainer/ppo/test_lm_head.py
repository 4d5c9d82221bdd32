"""Chosen-token log-probs and entropy through a frozen head, chunk by chunk: a case by hand,
then against the plain ``[N, V]`` logits path (values and gradients), chunked finely."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.ppo import lm_head
from trainer.ppo.core import logprobs_from_logits
from trainer.ppo.lm_head import head_logprobs


def test_a_two_word_vocabulary_by_hand() -> None:
    # z = h W^T = [ln 3, 0]: p = [3/4, 1/4]
    weight = torch.tensor([[1.0], [0.0]])
    hidden = torch.tensor([[math.log(3.0)]], requires_grad=True)
    logprobs, entropy = head_logprobs(hidden, weight, torch.tensor([0]), entropy_grad=True)
    assert logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy.item() == pytest.approx(h, abs=1e-6)
    # d logp / d h = (1 - p0) * W_0 + (0 - p1) * W_1 = 1/4
    (grad,) = torch.autograd.grad(logprobs.sum(), hidden, retain_graph=True)
    assert grad.item() == pytest.approx(0.25, abs=1e-6)
    # d H / d h = -p0 (log p0 + H) * W_0 - p1 (log p1 + H) * W_1 = -3/4 (ln 3/4 + H)
    (grad,) = torch.autograd.grad(entropy.sum(), hidden)
    assert grad.item() == pytest.approx(-0.75 * (math.log(0.75) + h), abs=1e-6)


def test_the_temperature_divides_the_logits_and_their_gradient() -> None:
    weight = torch.tensor([[1.0], [0.0]])
    hidden = torch.tensor([[math.log(3.0)]], requires_grad=True)
    logprobs, _ = head_logprobs(hidden, weight, torch.tensor([0]), temperature=2.0)
    p0 = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)  # softmax([ln 3 / 2, 0])[0]
    assert logprobs.item() == pytest.approx(math.log(p0), abs=1e-6)
    (grad,) = torch.autograd.grad(logprobs.sum(), hidden)
    assert grad.item() == pytest.approx((1.0 - p0) / 2.0, abs=1e-6)


def _plain(hidden, weight, tokens, temperature):
    logits = hidden @ weight.T
    z = logits / temperature
    entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    return logprobs_from_logits(logits, tokens, temperature), entropy


def test_chunked_matches_the_plain_logits_path_in_values_and_gradients(monkeypatch) -> None:
    monkeypatch.setattr(lm_head, "CHUNK_LOGITS", 100)  # 2 rows per chunk of 50 words
    assert lm_head.chunk_rows(50) == 2
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    tokens = torch.randint(0, 50, (37,))
    coef_lp, coef_h = torch.randn(37), torch.randn(37)
    grads = []
    for fused in (True, False):
        hidden = torch.randn(37, 8, generator=torch.Generator().manual_seed(1))
        hidden.requires_grad_(True)
        if fused:
            lp, ent = head_logprobs(hidden, weight, tokens, 0.7, entropy_grad=True)
        else:
            lp, ent = _plain(hidden, weight, tokens, 0.7)
        ((coef_lp * lp).sum() + (coef_h * ent).sum()).backward()
        grads.append((lp.detach(), ent.detach(), hidden.grad))
    for fused_part, plain_part in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(fused_part, plain_part, atol=1e-4, rtol=1e-4)


def test_without_entropy_grad_the_entropy_is_only_a_number() -> None:
    hidden = torch.randn(5, 4, requires_grad=True)
    lp, ent = head_logprobs(hidden, torch.randn(9, 4), torch.tensor([0, 1, 2, 3, 4]))
    assert lp.requires_grad and not ent.requires_grad
    lp.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_no_gradient_pass_gives_the_same_numbers() -> None:
    torch.manual_seed(2)
    hidden, weight, tokens = torch.randn(6, 4), torch.randn(9, 4), torch.randint(0, 9, (6,))
    with torch.no_grad():
        lp, ent = head_logprobs(hidden, weight, tokens, 1.3)
    with_grad = head_logprobs(hidden.clone().requires_grad_(True), weight, tokens, 1.3)
    torch.testing.assert_close(lp, with_grad[0].detach())
    torch.testing.assert_close(ent, with_grad[1].detach())


def test_a_pass_without_entropy_takes_only_the_log_probs() -> None:
    torch.manual_seed(4)
    hidden, weight, tokens = torch.randn(6, 4), torch.randn(9, 4), torch.randint(0, 9, (6,))
    with torch.no_grad():
        both = head_logprobs(hidden, weight, tokens, 0.8)
        alone = head_logprobs(hidden, weight, tokens, 0.8, with_entropy=False)
    assert alone[1] is None and both[1] is not None
    assert torch.equal(alone[0], both[0])


def test_bfloat16_products_give_float32_results_and_a_hidden_dtype_gradient() -> None:
    torch.manual_seed(3)
    weight = torch.randn(20, 8)
    hidden = torch.randn(4, 8, requires_grad=True)
    tokens = torch.tensor([1, 5, 7, 19])
    lp, _ = head_logprobs(hidden, weight.bfloat16(), tokens, dtype=torch.bfloat16)
    assert lp.dtype == torch.float32
    reference = logprobs_from_logits((hidden.bfloat16() @ weight.bfloat16().T).float(), tokens)
    torch.testing.assert_close(lp, reference.detach())
    lp.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32


def test_a_head_that_trains_is_refused() -> None:
    weight = torch.randn(9, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen head"):
        head_logprobs(torch.randn(2, 4), weight, torch.tensor([0, 1]))
