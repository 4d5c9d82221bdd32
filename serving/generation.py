"""What chat completions and legacy completions share: a prepared request, the engine
run, and what every answered request leaves behind (metrics, one interaction event).

The contract of each step:
- `Generation.route` — the policy serving this caller under ``model``, or the 404/503.
- `Generation.room` — tokens left for the answer, or the 400 when they do not fit.
- `Generation.start` — hands the request to the engine and waits for its first output,
  so a request the engine refuses is a 400 before any byte of the answer is sent (a
  refusal never counts as a server fault); an engine fault is reported (`RequestFailed`,
  the canary's guardrail) and re-raised. From here the request counts as in flight until
  `Generation.collect` (a whole answer) or the stream's end.
- `Generation.finish` — metrics and the `InteractionLogged` event; never raises (the
  answer matters more than its log line; the publisher counts what it drops).
- `Generation.abandon` — instead of `finish` when the client went away first: the engine
  request is aborted and no interaction is logged (nobody saw the whole answer); not a
  server fault, so no `RequestFailed` either.
Both charge the completion tokens generated to the principal's budget (`serving.limits`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from schemas import topics
from schemas.chat import FinishReason, Usage
from schemas.events import (
    InteractionLogged,
    LoggedChoice,
    LoggedMessage,
    LoggedToolCall,
    RequestFailed,
    SamplingRecord,
)
from schemas.sampling import SamplingFields, sampling_record_fields
from schemas.settings import Settings
from serving import metrics
from serving.api_keys import Principal
from serving.engine import Engine
from serving.errors import APIError
from serving.policies import PolicyRouter, PolicyTarget, PolicyUnavailable, UnknownModel
from serving.publisher import PRODUCER, EventPublisher
from serving.response_ids import ResponseIdSigner

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams

    from serving.limits import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who asked: the API key's principal, the end user the product named (recorded on
    the event and bound into the response id), and what sticky routing hashes."""

    principal: Principal
    user: str | None
    routing_key: str

    @property
    def may_pin(self) -> bool:
        return self.principal.may("pin")


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    endpoint: Literal["chat", "completions"]
    request: SamplingFields
    response_id: str
    created: int
    policy: PolicyTarget
    prompt_ids: list[int]
    params: SamplingParams
    record: SamplingRecord
    caller: Caller
    messages: list[LoggedMessage]
    prompt: str | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def visible_version(self) -> str | None:
        """The policy version as the caller may see it: only a ``pin`` key learns its arm."""
        return self.policy.version if self.caller.may_pin else None


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # one position dict per token
    finish_reason: FinishReason | None = None
    tool_calls: list[LoggedToolCall] = field(default_factory=list)

    def full_text(self) -> str:
        return "".join(self.text)

    def take(self, out: Any) -> None:
        """Record one engine ``CompletionOutput`` (a delta, or the whole final one)."""
        self.token_ids.extend(out.token_ids)
        if out.text:
            self.text.append(out.text)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finish_reason is not None:
            self.finish_reason = finish_reason(out.finish_reason)


def finish_reason(vllm_reason: str | None) -> FinishReason | None:
    """vLLM's finish reason as the API reports it: stop or length; anything else is None."""
    if vllm_reason == "stop":
        return "stop"
    if vllm_reason == "length":
        return "length"
    return None


def usage_of(p: Prepared, states: dict[int, ChoiceState]) -> Usage:
    completion = sum(len(st.token_ids) for st in states.values())
    return Usage(
        prompt_tokens=len(p.prompt_ids),
        completion_tokens=completion,
        total_tokens=len(p.prompt_ids) + completion,
    )


class Generation:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        router: PolicyRouter,
        signer: ResponseIdSigner,
        publisher: EventPublisher,
        limits: Limits | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.router = router
        self.signer = signer
        self.publisher = publisher
        self.limits = limits

    # -- before the engine -----------------------------------------------------------
    def check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise APIError(
                400,
                f"n must be between 1 and {self.settings.max_n}; got {n}.",
                param="n",
                code="invalid_value",
            )

    async def route(self, model: str, caller: Caller) -> PolicyTarget:
        """The policy serving ``caller`` under ``model``, or the 403/404/503 that says why
        not. Naming a version rather than the served model needs the ``pin`` scope."""
        if model != self.settings.served_model_name and not caller.may_pin:
            raise APIError(
                403,
                f"Only the model '{self.settings.served_model_name}' is served to the key "
                f"'{caller.principal.name}'; naming a policy version needs the 'pin' scope.",
                type="permission_error",
                param="model",
                code="insufficient_scope",
            )
        try:
            return await self.router.resolve(model, caller.routing_key)
        except UnknownModel:
            raise APIError(
                404,
                f"The model '{model}' does not exist. Available: "
                f"{', '.join(self.router.model_names())}.",
                param="model",
                code="model_not_found",
            ) from None
        except PolicyUnavailable as e:
            raise APIError(
                503,
                f"{e}. Try again later, or use model '{self.settings.served_model_name}'.",
                type="server_error",
                param="model",
                code="policy_unavailable",
            ) from None

    def room(self, n_prompt: int, asked: int | None, param: str, prompt_param: str) -> int:
        """Tokens left for the answer, or the 400 when the prompt (and the asked maximum)
        do not fit the context window."""
        limit = self.engine.max_model_len
        if n_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the "
                f"{prompt_param} use {n_prompt} tokens. Shorten the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = limit - n_prompt
        if asked is not None and asked > room:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n_prompt + asked} tokens ({n_prompt} in the "
                f"{prompt_param}, {asked} in the completion). Reduce the length of the "
                f"{prompt_param} or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        return room

    def new_id(self, caller: Caller, n: int) -> tuple[str, int]:
        now = time.time()
        return self.signer.new_id(caller.principal.name, caller.user, n, now), int(now)

    # -- the engine ------------------------------------------------------------------
    async def start(self, p: Prepared) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
        """The engine's first output (None if it produced none) and the rest of them."""
        from vllm.exceptions import VLLMClientError

        metrics.IN_FLIGHT.inc()
        outputs = self.engine.generate(p.prompt_ids, p.params, p.response_id, p.policy.adapter)
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            return None, outputs
        except (VLLMClientError, ValueError) as e:  # vLLM's own request validation
            metrics.IN_FLIGHT.dec()
            await outputs.aclose()  # type: ignore[attr-defined]
            raise APIError(400, f"The request was refused by the engine: {e}") from None
        except BaseException as exc:
            metrics.IN_FLIGHT.dec()
            if isinstance(exc, Exception):
                self.report_failure(p, exc)
            raise
        return first, outputs

    async def collect(
        self, p: Prepared, first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
    ) -> dict[int, ChoiceState]:
        """A whole answer: every choice's final state (an engine fault is reported and
        re-raised); the request stops counting as in flight."""
        final = first
        try:
            async for out in rest:
                final = out
        except Exception as exc:
            self.report_failure(p, exc)
            raise
        finally:
            metrics.IN_FLIGHT.dec()
        states: dict[int, ChoiceState] = {}
        for o in final.outputs if final is not None else ():
            states.setdefault(o.index, ChoiceState()).take(o)
        return states

    def report_failure(self, p: Prepared, exc: BaseException) -> None:
        """An engine fault, counted against the version (the canary's 5xx guardrail) with
        the model, arm and principal; not for a pinned request, whose caller chose the
        version and could otherwise steer the guardrail."""
        log.error("engine fault on %s (%s): %s", p.response_id, p.policy.version, exc)
        if p.policy.arm == "pinned":
            return
        event = RequestFailed(
            producer=PRODUCER,
            version=p.policy.version,
            status=500,
            error=f"{type(exc).__name__}: {exc}"[:1000],
            model=p.request.model,
            arm=p.policy.arm,
            principal=p.caller.principal.name,
        )
        try:
            self.publisher.publish(topics.POLICY, event)
        except Exception:
            log.exception("could not report the failure of %s", p.response_id)

    # -- after the engine ------------------------------------------------------------
    def finish(
        self,
        p: Prepared,
        states: dict[int, ChoiceState],
        ttft: float | None,
        stream: bool,
    ) -> Usage:
        """Observe the request's metrics and log its interaction; returns its usage."""
        latency = time.perf_counter() - p.started
        usage = usage_of(p, states)
        v, s = p.policy.version, str(stream).lower()
        metrics.LATENCY.labels(v, s).observe(latency)
        if ttft is not None:
            metrics.TTFT.labels(v, s).observe(ttft)
        metrics.COMPLETION_TOKENS.labels(v).inc(usage.completion_tokens)
        metrics.PROMPT_TOKENS.labels(v).inc(usage.prompt_tokens)
        if self.limits is not None:
            self.limits.charge(p.caller.principal.name, usage.completion_tokens)
        try:
            event = InteractionLogged(
                producer=PRODUCER,
                endpoint=p.endpoint,
                prompt=p.prompt,
                response_id=p.response_id,
                user=p.caller.user,
                principal=p.caller.principal.name,
                policy_version=p.policy.version,
                model=p.request.model,
                messages=p.messages,
                choices=[
                    LoggedChoice(
                        index=i,
                        text=st.full_text(),
                        finish_reason=st.finish_reason,
                        completion_tokens=len(st.token_ids),
                        tool_calls=st.tool_calls,
                    )
                    for i, st in sorted(states.items())
                ],
                prompt_tokens=len(p.prompt_ids),
                completion_tokens=usage.completion_tokens,
                latency_ms=latency * 1000.0,
                ttft_ms=None if ttft is None else ttft * 1000.0,
                stream=stream,
                sampling=p.record,
            )
            self.publisher.publish(topics.INTERACTIONS, event)
        except Exception:
            log.exception("could not hand interaction %s to the publisher", p.response_id)
        return usage

    def abandon(self, p: Prepared, states: dict[int, ChoiceState], stream: bool) -> None:
        """The client went away before the answer ended: stop the engine, charge what was
        generated for it, log no interaction."""
        self.engine.abort(p.response_id)
        metrics.ABORTED.labels(str(stream).lower()).inc()
        if self.limits is not None:
            self.limits.charge(p.caller.principal.name, usage_of(p, states).completion_tokens)
        log.info("%s: the client went away; its generation was aborted", p.response_id)


async def chain(
    first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs again, the first one (taken by `Generation.start`) included."""
    if first is not None:
        yield first
    async for out in rest:
        yield out


def sampling_record(req: SamplingFields, max_tokens: int, **v2: Any) -> SamplingRecord:
    """The event's record of how the answer was sampled."""
    return SamplingRecord(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=max_tokens,
        n=req.n,
        seed=req.seed,
        stop=req.stop_list(),
        **sampling_record_fields(req),
        **{k: v for k, v in v2.items() if v is not None},
    )
