"""Legacy text completions (POST /v1/completions): a raw prompt, no chat template.

The same steps as `serving.chat` (prepare → open → complete or stream → finish), the
same routing, response ids, events (``endpoint: completions``) and feedback. What
differs is the prompt (tokenized as is), ``echo`` (the prompt is prepended to each
answer) and the legacy ``logprobs`` shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.chat import Usage
from schemas.completions import Completion, CompletionChoice, CompletionRequest
from serving import metrics
from serving.chat import sse_error
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
from serving.logprobs import completion_logprobs
from serving.sampling import check_logit_bias, sampling_params

if TYPE_CHECKING:
    from vllm import RequestOutput

log = logging.getLogger(__name__)


@dataclass
class CompletionPrepared:
    base: Prepared
    request: CompletionRequest


class CompletionService:
    def __init__(self, generation: Generation) -> None:
        self.gen = generation
        self.engine = generation.engine
        self.settings = generation.settings

    async def prepare(self, req: CompletionRequest, caller: Caller) -> CompletionPrepared:
        g = self.gen
        g.check_n(req.n)
        policy = await g.route(req.model, caller)
        prompt = req.prompt_text()
        prompt_ids = await self.engine.text_prompt_ids(prompt)
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        # OpenAI's default of 16 is capped by the room left; only an asked-for maximum
        # that does not fit is an error.
        asked = req.max_tokens if "max_tokens" in req.model_fields_set else None
        room = g.room(len(prompt_ids), asked, "max_tokens", "prompt")
        max_tokens = asked if asked is not None else min(req.max_tokens or room, room)
        check_logit_bias(req, self.engine.vocab_size)
        params = sampling_params(
            req, max_tokens=max_tokens, stream=req.stream, logprobs=req.logprobs
        )
        response_id, created = g.new_id(caller, req.n)
        base = Prepared(
            endpoint="completions",
            request=req,
            response_id=response_id,
            created=created,
            policy=policy,
            prompt_ids=prompt_ids,
            params=params,
            record=sampling_record(req, max_tokens, logprobs=req.logprobs),
            caller=caller,
            messages=[],
            prompt=prompt,
        )
        return CompletionPrepared(base, req)

    async def open(
        self, p: CompletionPrepared
    ) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
        """Start the engine (a refusal is a 400 here); the request counts as in flight
        until `complete` or `stream` ends it."""
        return await self.gen.start(p.base)

    async def complete(
        self,
        p: CompletionPrepared,
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
    ) -> Completion:
        states = await self.gen.collect(p.base, first, rest)
        usage = self.gen.finish(p.base, states, ttft=None, stream=False)
        return Completion(
            id=p.base.response_id,
            created=p.base.created,
            model=p.request.model,
            choices=[
                self._choice(p, i, st.full_text(), st.token_ids, st.logprobs, st.finish_reason)
                for i, st in sorted(states.items())
            ],
            usage=usage,
            policy_version=p.base.visible_version,
        )

    def _choice(
        self,
        p: CompletionPrepared,
        index: int,
        text: str,
        ids: list[int],
        positions: list[Any],
        reason: str | None,
        *,
        first: bool = True,
    ) -> CompletionChoice:
        """A choice (or a streamed piece of one: ``first`` says whether the echo and the
        offsets start here)."""
        echo = p.request.prompt_text() if p.request.echo and first else ""
        logprobs = None
        if p.request.logprobs is not None:
            logprobs = completion_logprobs(ids, positions, p.request.logprobs, len(echo))
        return CompletionChoice(
            index=index,
            text=echo + text,
            logprobs=logprobs,
            finish_reason=reason,  # type: ignore[arg-type]
        )

    async def stream(
        self,
        p: CompletionPrepared,
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        req = p.request
        states = {i: ChoiceState() for i in range(req.n)}
        ttft: float | None = None
        aborted = False
        try:
            async for out in chain(first, rest):
                if ttft is None and any(o.token_ids for o in out.outputs):
                    ttft = time.perf_counter() - p.base.started
                pieces = []
                for o in out.outputs:
                    st = states[o.index]
                    was_empty = not st.token_ids and not st.text
                    st.take(o)
                    if o.text or o.finish_reason is not None or (req.echo and was_empty):
                        pieces.append(
                            self._choice(
                                p,
                                o.index,
                                o.text,
                                list(o.token_ids),
                                list(o.logprobs or []),
                                st.finish_reason if o.finish_reason is not None else None,
                                first=was_empty,
                            )
                        )
                if pieces:
                    usage = usage_of(p.base, states) if req.continuous_usage() else None
                    yield _sse(p, pieces, usage)
            if req.include_usage():
                yield _sse(p, [], usage_of(p.base, states))
            yield "data: [DONE]\n\n"
        except Exception as exc:
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


def _sse(p: CompletionPrepared, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
    body = Completion(
        id=p.base.response_id,
        created=p.base.created,
        model=p.request.model,
        choices=choices,
        usage=usage,
        policy_version=p.base.visible_version,
    )
    return f"data: {body.model_dump_json()}\n\n"
