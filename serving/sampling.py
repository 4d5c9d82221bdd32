"""A validated request's fields as vLLM ``SamplingParams``, and the checks that need the
model (token ids that must exist) before the engine sees them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas.sampling import SamplingFields
from serving.errors import APIError

if TYPE_CHECKING:
    from vllm import SamplingParams


def check_logit_bias(req: SamplingFields, vocab_size: int) -> None:
    """Every biased token id must exist (vLLM would fail the request on the engine)."""
    for token_id in req.logit_bias_ids():
        if token_id >= vocab_size:
            raise APIError(
                400,
                f"Invalid value for 'logit_bias': token id {token_id} is outside the "
                f"vocabulary (0..{vocab_size - 1}).",
                param="logit_bias",
                code="invalid_value",
            )


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int,
    stream: bool,
    logprobs: int | None = None,
    structured: dict[str, Any] | None = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    """``structured``: one `StructuredOutputsParams` constraint, e.g. ``{"json": schema}``
    or ``{"json_object": True}``. ``skip_special_tokens``: overrides the request's (tool
    calls may be written with special tokens the parser must see). A combination vLLM
    refuses is a 400 (its checks are the client's mistakes, not the server's)."""
    from vllm.exceptions import VLLMClientError

    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens ({req.min_tokens}) must not exceed the completion's maximum "
            f"({max_tokens} tokens).",
            param="min_tokens",
            code="invalid_value",
        )
    try:
        return _build(req, max_tokens, stream, logprobs, structured, skip_special_tokens)
    except (VLLMClientError, ValueError) as e:
        raise APIError(400, f"Invalid sampling parameters: {e}", code="invalid_value") from None


def _build(
    req: SamplingFields,
    max_tokens: int,
    stream: bool,
    logprobs: int | None,
    structured: dict[str, Any] | None,
    skip_special_tokens: bool | None,
) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    optional = {
        name: getattr(req, name)
        for name in (
            "temperature", "top_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "top_k", "min_p", "min_tokens",
        )
        if getattr(req, name) is not None
    }  # fmt: skip
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        seed=req.seed,
        stop=req.stop_list() or None,
        logit_bias=req.logit_bias_ids() or None,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=(
            req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        ),
        logprobs=logprobs,
        structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        **optional,
    )
