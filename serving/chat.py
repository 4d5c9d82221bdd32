"""Chat completions: validate against the model's limits, generate, answer, log.

The flow of one request, in order:
1. `prepare` — route to a policy version, render the chat template, check the prompt
   and the completion budget against the context window, build sampling parameters;
   every problem is a 4xx `APIError` before the engine sees anything.
2. `complete` (whole answer) or `stream` (server-sent events) — run the engine.
3. `_log` — one `InteractionLogged` event per request, handed to the publisher, which
   never blocks (it spools to disk while Kafka is away).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas import topics
from schemas.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    Usage,
)
from schemas.events import (
    InteractionLogged,
    LoggedChoice,
    LoggedMessage,
    RequestFailed,
    SamplingRecord,
)
from schemas.settings import Settings
from serving import metrics
from serving.engine import Engine
from serving.errors import APIError
from serving.policies import PolicyRouter, PolicyTarget, PolicyUnavailable, UnknownModel
from serving.publisher import PRODUCER, EventPublisher
from serving.response_ids import ResponseIdSigner

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    request: ChatCompletionRequest
    response_id: str
    created: int
    policy: PolicyTarget
    prompt_ids: list[int]
    sampling: SamplingRecord
    user: str | None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: FinishReason | None = None


def _finish_reason(vllm_reason: str | None) -> FinishReason | None:
    """vLLM's finish reason as the API reports it: stop or length; anything else is None."""
    if vllm_reason == "stop":
        return "stop"
    if vllm_reason == "length":
        return "length"
    return None


class ChatService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        router: PolicyRouter,
        signer: ResponseIdSigner,
        publisher: EventPublisher,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.router = router
        self.signer = signer
        self.publisher = publisher

    # -- 1. validate ---------------------------------------------------------------------
    async def prepare(
        self, req: ChatCompletionRequest, user: str | None, user_key: str
    ) -> Prepared:
        """``user`` is what the event records; ``user_key`` is what routing hashes (the
        user, else a user header, API key or client address)."""
        s = self.settings
        if req.n > s.max_n:
            raise APIError(
                400,
                f"n must be between 1 and {s.max_n}; got {req.n}.",
                param="n",
                code="invalid_value",
            )
        policy = await self._resolve(req.model, user_key)
        prompt_ids = self.engine.prompt_token_ids(req.messages)
        asked = req.requested_max_tokens()
        room = self._room(len(prompt_ids), asked, bool(req.max_completion_tokens))
        sampling = SamplingRecord(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=asked if asked is not None else min(s.default_max_tokens, room),
            n=req.n,
            seed=req.seed,
            stop=req.stop_list(),
        )
        return Prepared(
            request=req,
            response_id=self.signer.new_id(),
            created=int(time.time()),
            policy=policy,
            prompt_ids=prompt_ids,
            sampling=sampling,
            user=user,
        )

    async def _resolve(self, model: str, user_key: str) -> PolicyTarget:
        """The policy serving ``user_key`` under ``model``, or the 404/503 that says why not."""
        try:
            return await self.router.resolve(model, user_key)
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

    def _room(self, n_prompt: int, asked: int | None, completion_param: bool) -> int:
        """Tokens left for the answer, or the 400 when the prompt (and the asked maximum)
        do not fit the context window."""
        limit = self.engine.max_model_len
        if n_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the "
                f"messages use {n_prompt} tokens. Shorten the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        room = limit - n_prompt
        if asked is not None and asked > room:
            param = "max_completion_tokens" if completion_param else "max_tokens"
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n_prompt + asked} tokens ({n_prompt} in the "
                f"messages, {asked} in the completion). Reduce the length of the messages "
                f"or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        return room

    def _sampling_params(self, p: Prepared, stream: bool) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        r = p.sampling
        return SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=r.max_tokens,
            seed=r.seed,
            stop=r.stop or None,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    # -- 2a. whole answer ----------------------------------------------------------------
    async def complete(self, p: Prepared) -> ChatCompletion:
        version = p.policy.version
        metrics.IN_FLIGHT.inc()
        try:
            final = None
            async for out in self.engine.generate(
                p.prompt_ids,
                self._sampling_params(p, stream=False),
                p.response_id,
                p.policy.adapter,
            ):
                final = out
        except Exception as exc:
            self._report_failure(p, exc)
            raise
        finally:
            metrics.IN_FLIGHT.dec()
        assert final is not None
        latency = time.perf_counter() - p.started
        states = {
            o.index: _ChoiceState([o.text], len(o.token_ids), _finish_reason(o.finish_reason))
            for o in final.outputs
        }
        usage = self._usage(p, states)
        # Without streaming the first token is not observable apart from the last.
        self._observe(p, latency, ttft=None, usage=usage, stream=False)
        self._log(p, states, latency, ttft=None, stream=False)
        return ChatCompletion(
            id=p.response_id,
            created=p.created,
            model=p.request.model,
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content="".join(st.text)),
                    finish_reason=st.finish_reason,
                )
                for i, st in sorted(states.items())
            ],
            usage=usage,
            policy_version=version,
        )

    # -- 2b. server-sent events ----------------------------------------------------------
    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        req = p.request
        states = {i: _ChoiceState() for i in range(req.n)}
        ttft: float | None = None
        finished = False

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return _sse_chunk(p, choices, usage)

        metrics.IN_FLIGHT.inc()
        try:
            yield chunk(
                [
                    ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                    for i in range(req.n)
                ]
            )
            async for out in self.engine.generate(
                p.prompt_ids,
                self._sampling_params(p, stream=True),
                p.response_id,
                p.policy.adapter,
            ):
                if ttft is None and any(o.token_ids for o in out.outputs):
                    ttft = time.perf_counter() - p.started
                pieces = _deltas(out, states)
                if pieces:
                    yield chunk(pieces)
            finished = True
            usage = self._usage(p, states)
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        except Exception as exc:
            # Headers (200) are already sent: report in-band, as OpenAI's server does.
            log.exception("stream %s failed", p.response_id)
            self._report_failure(p, exc)
            yield sse_error("The engine failed while generating this response.")
            yield "data: [DONE]\n\n"
        finally:
            metrics.IN_FLIGHT.dec()
            latency = time.perf_counter() - p.started
            usage = self._usage(p, states)
            self._observe(p, latency, ttft, usage, stream=True)
            if not finished:
                log.info("stream %s ended early (client went away)", p.response_id)
            self._log(p, states, latency, ttft, stream=True)

    # -- 3. measure and log --------------------------------------------------------------
    def _report_failure(self, p: Prepared, exc: BaseException) -> None:
        """A server-side failure, counted against the version (the canary guardrail)."""
        event = RequestFailed(
            producer=PRODUCER,
            version=p.policy.version,
            status=500,
            error=f"{type(exc).__name__}: {exc}"[:1000],
        )
        try:
            self.publisher.publish(topics.POLICY, event)
        except Exception:
            log.exception("could not report the failure of %s", p.response_id)

    def _usage(self, p: Prepared, states: dict[int, _ChoiceState]) -> Usage:
        completion = sum(st.tokens for st in states.values())
        return Usage(
            prompt_tokens=len(p.prompt_ids),
            completion_tokens=completion,
            total_tokens=len(p.prompt_ids) + completion,
        )

    def _observe(
        self, p: Prepared, latency: float, ttft: float | None, usage: Usage, stream: bool
    ) -> None:
        v, s = p.policy.version, str(stream).lower()
        metrics.LATENCY.labels(v, s).observe(latency)
        if ttft is not None:
            metrics.TTFT.labels(v, s).observe(ttft)
        metrics.COMPLETION_TOKENS.labels(v).inc(usage.completion_tokens)
        metrics.PROMPT_TOKENS.labels(v).inc(usage.prompt_tokens)

    def _log(
        self,
        p: Prepared,
        states: dict[int, _ChoiceState],
        latency: float,
        ttft: float | None,
        stream: bool,
    ) -> None:
        event = InteractionLogged(
            producer=PRODUCER,
            response_id=p.response_id,
            user=p.user,
            policy_version=p.policy.version,
            model=p.request.model,
            messages=[LoggedMessage(role=m.role, content=m.text()) for m in p.request.messages],
            choices=[
                LoggedChoice(
                    index=i,
                    text="".join(st.text),
                    finish_reason=st.finish_reason,
                    completion_tokens=st.tokens,
                )
                for i, st in sorted(states.items())
            ],
            prompt_tokens=len(p.prompt_ids),
            completion_tokens=sum(st.tokens for st in states.values()),
            latency_ms=latency * 1000.0,
            ttft_ms=None if ttft is None else ttft * 1000.0,
            stream=stream,
            sampling=p.sampling,
        )
        try:
            self.publisher.publish(topics.INTERACTIONS, event)
        except Exception:  # the answer matters more than its log line; the publisher counts drops
            log.exception("could not hand interaction %s to the publisher", p.response_id)


def sse_error(message: str) -> str:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


def _sse_chunk(p: Prepared, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    """One ``chat.completion.chunk`` server-sent event."""
    body = ChatCompletionChunk(
        id=p.response_id,
        created=p.created,
        model=p.request.model,
        choices=choices,
        usage=usage,
        policy_version=p.policy.version,
    )
    return f"data: {body.model_dump_json()}\n\n"


def _deltas(out: RequestOutput, states: dict[int, _ChoiceState]) -> list[ChunkChoice]:
    """The new text (and finish reasons) of one engine output as chunk choices, recorded
    in each choice's state."""
    pieces = []
    for o in out.outputs:
        st = states[o.index]
        st.tokens += len(o.token_ids)
        if o.text:
            st.text.append(o.text)
        reason = _finish_reason(o.finish_reason)
        if o.text or reason:
            st.finish_reason = reason
            pieces.append(
                ChunkChoice(
                    index=o.index, delta=Delta(content=o.text or None), finish_reason=reason
                )
            )
    return pieces
