"""Tool calling end to end: tools rendered by the demo model's chat template, calls forced
by structured outputs or found by vLLM's hermes parser, tool results in the history, the
interaction event recording the calls, and feedback on a tool-calling answer."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from schemas import topics
from schemas.events import InteractionLogged
from tests.fixtures.events import wait_for_events
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Lima"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
# The demo model's context is 512 tokens and its small vocabulary spends many on JSON:
# the tools are kept short.


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0)


def _schema(name: str) -> dict:
    return next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)["function"][
        "parameters"
    ]


def _streamed_calls(chunks) -> tuple[list[dict], str, str | None]:
    calls: dict[int, dict] = {}
    content, reason = "", None
    for c in chunks:
        for ch in c.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return [calls[k] for k in sorted(calls)], content, reason


def test_required_and_named_choices_call_a_tool(serving, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in (named, "required"):
        for seed in range(2):
            r = client.chat.completions.create(
                model="alignloop", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                parallel_tool_calls=False, max_tokens=60, seed=seed,
            )  # fmt: skip
            [c] = r.choices
            assert c.finish_reason == ("stop" if choice is named else "tool_calls")
            [call] = c.message.tool_calls  # parallel_tool_calls=False: one call
            assert call.id.startswith("call_")
            if choice is named:
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
    # Streaming, parallel calls allowed: the calls arrive whole, no content. The demo model
    # tends to keep adding calls until max_tokens cuts the list: the complete ones count.
    chunks = client.chat.completions.create(
        model="alignloop", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=80, seed=3, stream=True,
    )  # fmt: skip
    calls, content, reason = _streamed_calls(chunks)
    assert calls and content == "" and reason in ("tool_calls", "length")
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), _schema(call["name"]))


def test_auto_tool_call_round_trip(serving, client):
    """The model may answer in text or call: either way the answer is well formed; then a
    tool result goes back in the history and the model answers it, and the events record
    the turns and the calls."""
    first = client.chat.completions.create(
        model="alignloop", messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0
    )
    [c] = first.choices
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        assert c.message.tool_calls[0].function.name == "get_weather"
    else:
        assert c.message.content and c.finish_reason in ("stop", "length")
    # A forced call, then its result in the history.
    called = client.chat.completions.create(
        model="alignloop", messages=ASK, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40,
    )  # fmt: skip
    call = called.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "4 degrees and rain"},
    ]
    answer = client.chat.completions.create(
        model="alignloop", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=24
    )
    assert answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    # Rendering tools costs prompt tokens: the template shows them to the model.
    bare = client.chat.completions.create(model="alignloop", messages=ASK, max_tokens=1)
    assert first.usage.prompt_tokens > bare.usage.prompt_tokens

    wanted = {called.id, answer.id}
    events = {
        e.response_id: e
        for e in wait_for_events(
            serving.broker.bootstrap,
            topics.INTERACTIONS,
            lambda e: e.response_id if isinstance(e, InteractionLogged) else "",
            wanted,
            timeout=60,
        )
    }
    assert events[called.id].schema_version == 2
    [logged] = events[called.id].choices[0].tool_calls
    assert (logged.id, logged.name, logged.arguments) == (
        call.id, "get_weather", call.function.arguments,
    )  # fmt: skip
    assert events[called.id].sampling.tool_choice == {
        "type": "function", "function": {"name": "get_weather"},
    }  # fmt: skip
    roles = [m.role for m in events[answer.id].messages]
    assert roles == ["user", "assistant", "tool"]
    assert events[answer.id].messages[1].tool_calls[0].name == "get_weather"
    assert events[answer.id].messages[2].tool_call_id == call.id

    # Feedback on a tool-calling answer is accepted like any other.
    r = httpx.post(
        f"{serving.base_url}/v1/feedback",
        json={"response_id": called.id, "rating": "up"},
        timeout=30,
        headers=AUTH,
    )
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tool_choice": "required"}, "requires tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not among the tools",
        ),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
        (
            {"messages": [{"role": "tool", "content": "4 C"}]},
            "tool_call_id",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "JSON Schema",
        ),
    ],
)
def test_inconsistent_tool_requests_are_a_400(client, fields, words):
    body = {"model": "alignloop", "messages": ASK, "max_tokens": 4, **fields}
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(**body)
    assert words in e.value.body["message"]


def test_auto_streams_text_through_the_hold(client):
    """With tools offered and no call made, the streamed text (held back only where it
    could begin a call) ends up equal to the whole answer."""
    kw = dict(model="alignloop", messages=ASK, tools=[WEATHER], max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, content, reason = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    if whole.message.tool_calls:
        assert [c["name"] for c in calls] == [c.function.name for c in whole.message.tool_calls]
    else:
        assert (calls, content, reason) == ([], whole.message.content, whole.finish_reason)
