"""The engine's per-token log-probabilities in OpenAI's two shapes.

vLLM returns, for each generated position, a dict from token id to ``Logprob`` holding
the sampled token and the ``k`` most likely ones (``SamplingParams.logprobs=k``), with
``rank`` 1 for the most likely. The values are the engine's own; nothing is recomputed.
A ``-inf`` (a token the sampler could never pick) is reported as -9999.0, as vLLM's
server does, because JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from schemas.chat import TokenLogprob, TopLogprob
from schemas.completions import CompletionLogprobs

if TYPE_CHECKING:
    from vllm.logprobs import Logprob

Position = Mapping[int, "Logprob"]


def _finite(x: float) -> float:
    return max(x, -9999.0) if not math.isnan(x) else -9999.0


def _token(lp: Logprob, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _top(position: Position, k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely tokens of one position, most likely first."""
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or math.inf, -kv[1].logprob))
    return ranked[:k]


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[Position], top_k: int
) -> list[TokenLogprob]:
    """Chat's ``logprobs.content``: one entry per generated token, with its top ``top_k``."""
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        text = _token(chosen, token_id)
        out.append(
            TokenLogprob(
                token=text,
                logprob=_finite(chosen.logprob),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=_token(lp, tid),
                        logprob=_finite(lp.logprob),
                        bytes=list(_token(lp, tid).encode()),
                    )
                    for tid, lp in _top(position, top_k)
                ],
            )
        )
    return out


def completion_logprobs(
    token_ids: Sequence[int], positions: Sequence[Position], top_k: int, offset: int
) -> CompletionLogprobs:
    """The legacy shape: parallel lists, ``text_offset`` counted from ``offset``."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    at = offset
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        text = _token(chosen, token_id)
        tokens.append(text)
        values.append(_finite(chosen.logprob))
        tops.append({_token(lp, tid): _finite(lp.logprob) for tid, lp in _top(position, top_k)})
        offsets.append(at)
        at += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )
