"""Random combinations of the chat and completions parameters, valid and not, against the
real server: every answer is a 200 or a 4xx in the OpenAI error shape, never a 5xx.

Seeded, so a failure names a reproducible body. The values are drawn per field from
valid ones, edge cases and wrong types; the combinations are what a table cannot list.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

COMMON = {
    "max_tokens": [1, 3, 0, -1, "3", None, 10**6],
    "temperature": [0, 0.7, 2, 2.5, -1, "hot", None],
    "top_p": [0.5, 1, 0, 1.5, None],
    "n": [1, 2, 0, 9, 2.5],
    "stop": ["x", ["a", "b"], "", [""], ["a"] * 5, 7, None],
    "seed": [0, 42, -1, 2**63 - 1, 2**63, 1.5, "7"],
    "presence_penalty": [0, 1.5, -2, 3, None],
    "frequency_penalty": [0, -1.5, 2.5, "x"],
    "logit_bias": [{"5": 10}, {"5": 101}, {"x": 1}, {"999999": 1}, [], {}],
    "user": ["u1", "", 5, None],
    "stream": [True, False, "yes"],
    "stream_options": [{"include_usage": True}, {"continuous_usage_stats": True}, {"x": 1}],
    "top_k": [1, 0, -1, -2, 50],
    "min_p": [0, 0.1, 1, 1.5],
    "repetition_penalty": [1, 1.2, 0, 3],
    "min_tokens": [0, 2, -1, 100],
    "ignore_eos": [True, False, 1],
    "skip_special_tokens": [True, False],
    "include_stop_str_in_output": [True, False],
    "store": [True, "x"],
    "metadata": [{"a": "b"}, {"a": 1}, "x"],
    "service_tier": ["auto", "gold"],
    "stop_token_ids": [[1]],
}
CHAT = {
    "max_completion_tokens": [2, 0, 10**6, None],
    "logprobs": [True, False, 3],
    "top_logprobs": [0, 3, 20, 21, -1],
    "response_format": [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 3}}},
        {"type": "json_schema", "json_schema": {"name": "bad name", "schema": SCHEMA}},
        {"type": "yaml"},
        "json",
    ],
    "tools": [[TOOL], [TOOL, TOOL], [], [{"type": "function"}], "f"],
    "tool_choice": [
        "auto",
        "none",
        "required",
        "sometimes",
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "g"}},
    ],
    "parallel_tool_calls": [True, False, "no"],
    "modalities": [["text"], ["audio"], "text"],
    "functions": [[{"name": "f"}]],
    "messages": [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "tool", "content": "4", "tool_call_id": "c1"}],
        [{"role": "assistant", "content": None}],
        [
            {"role": "user", "content": "w?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
        ],
        [{"role": "user", "content": "x", "audio": {}}],
        [],
    ],
}  # fmt: skip
COMPLETIONS = {
    "prompt": ["The capital of", ["a"], ["a", "b"], "", 5, [1, 2]],
    "echo": [True, False],
    "logprobs": [0, 2, 5, 6, True],
    "best_of": [1, 2, None],
    "suffix": ["x"],
}


def _body(rng: random.Random, endpoint: str) -> dict:
    fields = {**COMMON, **(CHAT if endpoint == "chat" else COMPLETIONS)}
    body: dict = {"model": "alignloop"}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "What is the capital of Fenwick?"}]
    else:
        body["prompt"] = "The capital of"
    for name in rng.sample(sorted(fields), k=rng.randint(1, 5)):
        body[name] = rng.choice(fields[name])
    body.setdefault("max_tokens", 3)
    return body


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_random_parameter_combinations_never_answer_5xx(serving, endpoint):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    rng = random.Random(17 if endpoint == "chat" else 18)
    statuses = []
    with httpx.Client(base_url=serving.base_url, timeout=120, headers=AUTH) as client:
        for _ in range(120):
            body = _body(rng, endpoint)
            if body.get("stream") is True:
                with client.stream("POST", path, json=body) as r:
                    text = r.read().decode()
            else:
                r = client.post(path, json=body)
                text = r.text
            statuses.append(r.status_code)
            assert r.status_code < 500, json.dumps(body)
            if r.status_code >= 400:
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, json.dumps(body)
            elif body.get("stream") is True:
                assert "server_error" not in text, json.dumps(body)
    # The draw covers both sides: some requests are answered, some refused.
    assert 200 in statuses and 400 in statuses
