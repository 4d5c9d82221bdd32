"""Legacy text completions (/v1/completions) end to end, with the official openai client:
routing, response ids, events and feedback as for chat; echo and the legacy logprobs."""

from __future__ import annotations

import httpx
import pytest
from openai import BadRequestError, OpenAI

from schemas import topics
from schemas.events import InteractionLogged
from serving.response_ids import PREFIX
from tests.fixtures.events import wait_for_events
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

PROMPT = "<|bos|><|user|>What is the capital of Fenwick?<|end|><|assistant|>"


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0)


def test_completion_round_trip_and_feedback(serving, client):
    raw = client.completions.with_raw_response.create(
        model="alignloop", prompt=PROMPT, max_tokens=12, temperature=0, user="carol"
    )
    assert raw.headers["x-alignloop-policy"] == "base"
    r = raw.parse()
    assert r.id.startswith(PREFIX)
    assert r.object == "text_completion"
    [c] = r.choices
    assert c.text and c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12
    # The same prompt through the chat template gives the same greedy answer.
    chat = client.chat.completions.create(
        model="alignloop",
        messages=[{"role": "user", "content": "What is the capital of Fenwick?"}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.choices[0].message.content == c.text

    streamed = list(
        client.completions.create(
            model="alignloop", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.text
    assert streamed[-1].usage.completion_tokens == r.usage.completion_tokens

    [event] = wait_for_events(
        serving.broker.bootstrap,
        topics.INTERACTIONS,
        lambda e: e.response_id if isinstance(e, InteractionLogged) else "",
        {r.id},
        timeout=60,
    )
    assert event.endpoint == "completions"
    assert event.prompt == PROMPT and event.messages == []
    assert event.user == "carol"
    assert event.choices[0].text == c.text

    ok = httpx.post(
        f"{serving.base_url}/v1/feedback",
        json={"response_id": r.id, "rating": "down", "user": "carol"},
        timeout=30,
        headers=AUTH,
    )
    assert ok.status_code == 202, ok.text


def test_echo_and_logprobs(client):
    echoed = client.completions.create(
        model="alignloop", prompt="The capital", max_tokens=4, temperature=0, echo=True
    )
    plain = client.completions.create(
        model="alignloop", prompt="The capital", max_tokens=4, temperature=0, logprobs=2,
        best_of=1,
    )  # fmt: skip
    assert echoed.choices[0].text == "The capital" + plain.choices[0].text
    lp = plain.choices[0].logprobs
    # Every generated token, the end-of-turn token that stopped it included.
    end = "<|end|>" if plain.choices[0].finish_reason == "stop" else ""
    assert "".join(lp.tokens) == plain.choices[0].text + end
    assert len(lp.token_logprobs) == plain.usage.completion_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value == max(top.values())  # greedy: the likeliest token


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"best_of": 3}, None),
        ({"suffix": "x"}, "suffix"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"logprobs": 9}, "logprobs"),
    ],
)
def test_bad_completion_requests_are_a_400(client, fields, param):
    body = {"model": "alignloop", "prompt": "hi", "max_tokens": 2, **fields}
    with pytest.raises(BadRequestError) as e:
        client.completions.create(**body)
    if param is not None:
        assert e.value.body["param"] == param
