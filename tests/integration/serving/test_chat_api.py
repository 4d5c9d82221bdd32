"""The chat API end to end: real vLLM engine, real HTTP, the official openai client."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from serving.response_ids import PREFIX

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of Fenwick?"}]


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0)


def test_models_lists_routed_name_and_base(client):
    models = client.models.list().data
    assert models[0].id == "alignloop"
    by_id = {m.id: m for m in models}
    # Without a database the base is the stable version; the routed name follows it.
    assert by_id["alignloop"].model_extra["state"] == "routed"
    assert by_id["base"].model_extra["state"] == "stable"
    assert by_id["base"].model_extra["parent"] == "alignloop"
    for m in models:
        assert m.owned_by == "alignloop" and m.created > 1_700_000_000
        assert m.model_extra["max_model_len"] == 512


def test_sync_round_trip(client):
    raw = client.chat.completions.with_raw_response.create(
        model="alignloop", messages=HELLO, max_tokens=24, user="alice"
    )
    assert raw.headers["x-alignloop-policy"] == "base"
    resp = raw.parse()
    assert resp.id.startswith(PREFIX)
    assert resp.object == "chat.completion"
    assert resp.model == "alignloop"
    assert resp.model_extra["policy_version"] == "base"
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_round_trip_with_usage(client):
    stream = client.chat.completions.create(
        model="alignloop",
        messages=HELLO,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith(PREFIX)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert 1 <= usage_chunks[0].usage.completion_tokens <= 24


def test_stream_and_non_stream_agree_under_the_same_seed(client):
    kwargs = dict(model="alignloop", messages=HELLO, max_tokens=20, seed=7, temperature=1.0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    )
    assert whole == streamed


def test_n_choices_and_length_limit(client):
    resp = client.chat.completions.create(
        model="base", messages=HELLO, n=3, max_completion_tokens=1, temperature=1.0
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 3


def test_stop_sequence_cuts_the_answer(client):
    first = (
        client.chat.completions.create(
            model="alignloop", messages=HELLO, max_tokens=30, seed=11, temperature=0
        )
        .choices[0]
        .message.content
    )
    words = first.split()
    assert len(words) >= 2, first
    stop = " " + words[1]
    cut = client.chat.completions.create(
        model="alignloop", messages=HELLO, max_tokens=30, seed=11, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.message.content
    assert first.startswith(cut.message.content)


def test_metrics_count_requests_by_policy(serving, client):
    client.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4)
    text = httpx.get(f"{serving.base_url}/metrics").text
    assert (
        'alignloop_http_requests_total{policy_version="base",route="/v1/chat/completions"'
        ',status="200"}' in text
    )
    assert "alignloop_time_to_first_token_seconds_bucket" in text
    assert 'alignloop_completion_tokens_total{policy_version="base"}' in text
