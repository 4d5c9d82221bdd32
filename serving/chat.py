"""Chat completions: validate against the model's limits, generate, answer, log.

The flow of one request, in order:
1. `ChatService.prepare` — route to a policy version, plan tool use (`serving.tools`),
   render the chat template, check the prompt and the completion budget against the
   context window, build the engine's sampling parameters (structured outputs for
   ``response_format`` and forced tool calls); every problem is a 4xx before the engine
   sees anything.
2. `ChatService.open` — the engine starts; a request it refuses is still a 400 here.
3. `ChatService.complete` (whole answer) or `ChatService.stream` (server-sent events).
4. `Generation.finish` — metrics and one `InteractionLogged` event per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FinishReason,
    NamedToolChoice,
    Usage,
)
from schemas.events import LoggedMessage, LoggedToolCall
from serving import metrics, tools
from serving.errors import APIError
from serving.generation import (
    Caller,
    ChoiceState,
    Generation,
    Prepared,
    chain,
    sampling_record,
    usage_of,
)
from serving.logprobs import chat_logprobs
from serving.sampling import check_logit_bias, sampling_params

if TYPE_CHECKING:
    from vllm import RequestOutput

log = logging.getLogger(__name__)


@dataclass
class ChatPrepared:
    base: Prepared
    request: ChatCompletionRequest
    tools: tools.ToolPlan
    top_logprobs: int | None  # None: no logprobs asked


class ChatService:
    def __init__(self, generation: Generation) -> None:
        self.gen = generation
        self.engine = generation.engine
        self.settings = generation.settings

    # -- 1. validate ---------------------------------------------------------------------
    async def prepare(self, req: ChatCompletionRequest, caller: Caller) -> ChatPrepared:
        g = self.gen
        g.check_n(req.n)
        policy = await g.route(req.model, caller)
        plan = tools.plan(req)
        try:
            prompt_ids = await self.engine.chat_prompt_ids(req.messages, plan.render_tools())
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        asked = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        room = g.room(len(prompt_ids), asked, param, "messages")
        max_tokens = asked if asked is not None else min(self.settings.default_max_tokens, room)
        check_logit_bias(req, self.engine.vocab_size)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(
            req,
            max_tokens=max_tokens,
            stream=req.stream,
            logprobs=top,
            structured=_structured(req, plan),
            # A tool-call marker that is a special token must reach the parser.
            skip_special_tokens=(
                False
                if plan.mode == "auto"
                and tools.marker_is_special(self.settings.tool_call_parser, self.engine.tokenizer)
                else None
            ),
        )
        record = sampling_record(
            req,
            max_tokens,
            logprobs=top,
            response_format=(
                req.response_format.model_dump(by_alias=True) if req.response_format else None
            ),
            tools=plan.tools or None,
            tool_choice=_choice_record(req),
            parallel_tool_calls=req.parallel_tool_calls if req.tools else None,
        )
        response_id, created = g.new_id(caller, req.n)
        base = Prepared(
            endpoint="chat",
            request=req,
            response_id=response_id,
            created=created,
            policy=policy,
            prompt_ids=prompt_ids,
            params=params,
            record=record,
            caller=caller,
            messages=[_logged(m) for m in req.messages],
        )
        return ChatPrepared(base, req, plan, top)

    # -- 2. start ------------------------------------------------------------------------
    async def open(
        self, p: ChatPrepared
    ) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
        """Start the engine (a refusal is a 400 here); the request counts as in flight
        until `complete` or `stream` ends it."""
        return await self.gen.start(p.base)

    # -- 3a. whole answer ----------------------------------------------------------------
    async def complete(
        self,
        p: ChatPrepared,
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
    ) -> ChatCompletion:
        states = await self.gen.collect(p.base, first, rest)
        choices = [self._choice(p, i, st) for i, st in sorted(states.items())]
        # Without streaming the first token is not observable apart from the last.
        usage = self.gen.finish(p.base, states, ttft=None, stream=False)
        return ChatCompletion(
            id=p.base.response_id,
            created=p.base.created,
            model=p.request.model,
            choices=choices,
            usage=usage,
            policy_version=p.base.visible_version,
        )

    def _choice(self, p: ChatPrepared, index: int, st: ChoiceState) -> Choice:
        text = st.full_text()
        content: str | None = text
        calls = None
        reason = st.finish_reason
        if p.tools.mode != "none":
            parsed = tools.parse(p.tools, text, self.settings.tool_call_parser, self._tok)
            if parsed.tool_calls:
                content, calls = parsed.content, parsed.tool_calls
                st.tool_calls = [_logged_call(c) for c in calls]
                reason = _tool_finish(p.tools, reason)
        return Choice(
            index=index,
            message=AssistantMessage(content=content, tool_calls=calls),
            finish_reason=reason,
            logprobs=self._logprobs(p, st.token_ids, st.logprobs),
        )

    @property
    def _tok(self) -> Any:
        return self.engine.tokenizer

    def _logprobs(
        self, p: ChatPrepared, ids: list[int], positions: list[Any]
    ) -> ChoiceLogprobs | None:
        if p.top_logprobs is None:
            return None
        return ChoiceLogprobs(content=chat_logprobs(ids, positions, p.top_logprobs))

    # -- 3b. server-sent events ----------------------------------------------------------
    # Long: the whole streaming state machine (deltas, holds, tool calls, usage, the
    # engine fault reported in-band, the log line whatever happens) reads best in one piece.
    async def stream(
        self,
        p: ChatPrepared,
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        req = p.request
        states = {i: ChoiceState() for i in range(req.n)}
        marker = (
            tools.start_marker(self.settings.tool_call_parser) if p.tools.mode == "auto" else None
        )
        holds = {i: tools.StreamHold(p.tools, marker) for i in range(req.n)}
        ttft: float | None = None
        aborted = False

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return _sse_chunk(p, choices, usage)

        try:
            yield chunk(
                [
                    ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                    for i in range(req.n)
                ]
            )
            async for out in chain(first, rest):
                if ttft is None and any(o.token_ids for o in out.outputs):
                    ttft = time.perf_counter() - p.base.started
                pieces = [self._delta(p, o, states[o.index], holds[o.index]) for o in out.outputs]
                kept = [c for c in pieces if c is not None]
                if kept:
                    usage = usage_of(p.base, states) if req.continuous_usage() else None
                    yield chunk(kept, usage)
            if req.include_usage():
                yield chunk([], usage_of(p.base, states))
            yield "data: [DONE]\n\n"
        except Exception as exc:
            # Headers (200) are already sent: report in-band, as OpenAI's server does.
            log.exception("stream %s failed", p.base.response_id)
            self.gen.report_failure(p.base, exc)
            yield sse_error("The engine failed while generating this response.")
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            aborted = True
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            if aborted:
                self.gen.abandon(p.base, states, stream=True)
            else:
                self.gen.finish(p.base, states, ttft, stream=True)

    def _delta(
        self, p: ChatPrepared, o: Any, st: ChoiceState, hold: tools.StreamHold
    ) -> ChunkChoice | None:
        """One choice's part of an engine output as a chunk choice (None: nothing to send)."""
        new_ids, new_positions = list(o.token_ids), list(o.logprobs or [])
        st.take(o)
        if p.tools.mode == "none":
            content = o.text or None
        else:
            content = hold.sendable(st.full_text()) or None
        calls = None
        reason = st.finish_reason if o.finish_reason is not None else None
        if reason is not None and p.tools.mode != "none":
            text = st.full_text()
            parsed = tools.parse(p.tools, text, self.settings.tool_call_parser, self._tok)
            if parsed.tool_calls:
                st.tool_calls = [_logged_call(c) for c in parsed.tool_calls]
                calls = [
                    DeltaToolCall(
                        index=k,
                        id=c.id,
                        type="function",
                        function=DeltaFunctionCall(
                            name=c.function.name, arguments=c.function.arguments
                        ),
                    )
                    for k, c in enumerate(parsed.tool_calls)
                ]
                reason = _tool_finish(p.tools, reason)
            else:  # no call after all: what was held back is content
                content = (content or "") + text[hold.sent :] or None
                hold.sent = len(text)
        logprobs = None
        if p.top_logprobs is not None and new_ids:
            logprobs = ChoiceLogprobs(content=chat_logprobs(new_ids, new_positions, p.top_logprobs))
        if content is None and calls is None and reason is None and logprobs is None:
            return None
        return ChunkChoice(
            index=o.index,
            delta=Delta(content=content, tool_calls=calls),
            finish_reason=reason,
            logprobs=logprobs,
        )


def _structured(req: ChatCompletionRequest, plan: tools.ToolPlan) -> dict[str, Any] | None:
    """The structured-outputs constraint of the answer, if any (one at most: the request
    model refuses ``response_format`` beside tools). Whether JSON may hold whitespace
    is the engine's setting (`Settings.json_compact`)."""
    forced = plan.constrained_json()
    if forced is not None:
        return {"json": forced}
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    return {"json": fmt.json_schema.schema_}


def _tool_finish(plan: tools.ToolPlan, reason: FinishReason | None) -> FinishReason | None:
    """OpenAI's finish reason for an answer that called tools: ``tool_calls``, except
    ``stop`` for a named function, and ``length`` stays ``length``."""
    if reason == "length":
        return reason
    return "stop" if plan.mode == "named" else "tool_calls"


def _choice_record(req: ChatCompletionRequest) -> str | dict[str, Any] | None:
    if req.tool_choice is None:
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return req.tool_choice.model_dump()
    return req.tool_choice


def _logged(m: ChatMessage) -> LoggedMessage:
    return LoggedMessage(
        role=m.role,
        content=m.text(),
        tool_calls=(
            [
                LoggedToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                for c in m.tool_calls
            ]
            if m.tool_calls
            else None
        ),
        tool_call_id=m.tool_call_id,
    )


def _logged_call(c: Any) -> LoggedToolCall:
    return LoggedToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)


def sse_error(message: str) -> str:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


def _sse_chunk(p: ChatPrepared, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    """One ``chat.completion.chunk`` server-sent event."""
    body = ChatCompletionChunk(
        id=p.base.response_id,
        created=p.base.created,
        model=p.request.model,
        choices=choices,
        usage=usage,
        policy_version=p.base.visible_version,
    )
    return f"data: {body.model_dump_json(exclude_none=False)}\n\n"
