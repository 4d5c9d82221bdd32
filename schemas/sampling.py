"""The request fields chat completions and legacy completions share: how to sample.

Every field here is honoured (see the parity table in `schemas.parity`), except the few
marked *accepted and ignored on purpose*, which change nothing about an answer. A field
that is not declared is refused with 400 ``unsupported_parameter`` (``extra="forbid"``);
nothing is silently dropped.

Bounds are the tighter of OpenAI's and vLLM's, so every value that passes here is one
the engine accepts: a client mistake is a 400 before the engine is called, never a 500.
Numbers are strict, as the published schema says (`schemas.openapi`): an integer is a fine
float, but ``true`` or ``"0.5"`` is a 400, not 1.0 or 0.5.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound, and the engine's ``max_logprobs`` default."""
MAX_STOP_SEQUENCES = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = Field(
        False, description="vLLM's extra: usage on every chunk, not only the last."
    )


class SamplingFields(BaseModel):
    """Sampling parameters, stopping, identity and streaming, as both APIs name them."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    logit_bias: dict[str, StrictFloat] | None = None
    user: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    # vLLM's extra sampling parameters (its OpenAI server accepts them too).
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, strict=True)
    min_tokens: StrictInt | None = Field(None, ge=0)
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False

    # Accepted and ignored on purpose: none of them changes an answer here.
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError("at most 300 tokens may be biased")
        for token, bias in v.items():
            if not token.isdigit() or len(token) > 12:
                raise ValueError(f"keys must be token ids (non-negative integers); got '{token}'")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be between -100 and 100; got {bias} for {token}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def sampling_record_fields(req: SamplingFields) -> dict[str, Any]:
    """The optional sampling fields a request set, as the interaction event records them."""
    names = (
        "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
        "min_tokens",
    )  # fmt: skip
    out: dict[str, Any] = {n: getattr(req, n) for n in names if getattr(req, n) is not None}
    if req.logit_bias:
        out["logit_bias"] = dict(req.logit_bias)
    if req.ignore_eos:
        out["ignore_eos"] = True
    return out
