"""The legacy text completions wire protocol (POST /v1/completions).

The prompt is raw text given to the model as is (no chat template). The same routing,
response ids, events and feedback apply as for chat completions; the sampling fields
are `schemas.sampling`'s. One prompt per request: a batch of prompts is refused, since
one response id names one prompt's answers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from schemas.chat import FinishReason, Usage
from schemas.sampling import SamplingFields

MAX_LEGACY_LOGPROBS = 5
"""OpenAI's bound for the legacy ``logprobs`` integer."""


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] = Field(description="One prompt (a list of one).")
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    best_of: StrictInt | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(
                f"one prompt per request (got a list of {len(v)}); send one request each"
            )
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported (every candidate is returned)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (prompt logprobs)")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    policy_version: str | None = None
    system_fingerprint: str | None = None
