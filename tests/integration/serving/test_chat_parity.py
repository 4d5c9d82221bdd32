"""Chat API parity: every parameter of the table in `schemas.parity` is honoured, ignored
on purpose, or refused, against the real serving process and the official openai client."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas import parity
from tests.fixtures.server import AUTH

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
ASK = [{"role": "user", "content": "What is the capital of Fenwick?"}]


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.base_url}/v1", api_key=serving.api_key, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


def ask(client: OpenAI, **kw):
    return client.chat.completions.create(
        model="alignloop", messages=kw.pop("messages", ASK), **{"max_tokens": 16, **kw}
    )


# -- the table, walked -----------------------------------------------------------------


def _minimal(endpoint: str) -> dict:
    if endpoint == "chat":
        return {"model": "alignloop", "messages": ASK, "max_tokens": 2}
    return {"model": "alignloop", "prompt": "The capital of", "max_tokens": 2}


# A value of the right type for each ignored field (its meaning must not matter).
IGNORED_VALUES = {
    "store": True,
    "metadata": {"team": "search"},
    "service_tier": "auto",
    "prompt_cache_key": "k1",
    "safety_identifier": "hash-of-user",
    "prediction": {"type": "content", "content": "Paris"},
}


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [(e, p.name) for e, table in parity.TABLES.items() for p in table if p.support == "refused"],
)
def test_refused_fields_are_a_400_naming_them(serving, endpoint, name):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    r = httpx.post(
        serving.base_url + path, json={**_minimal(endpoint), name: 1}, timeout=60, headers=AUTH
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == name
    assert f"'{name}'" in error["message"]


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [(e, p.name) for e, table in parity.TABLES.items() for p in table if p.support == "ignored"],
)
def test_ignored_fields_are_accepted_and_change_nothing(serving, endpoint, name):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    body = {**_minimal(endpoint), "temperature": 0, "max_tokens": 6}
    plain = httpx.post(serving.base_url + path, json=body, timeout=60, headers=AUTH)
    with_it = httpx.post(
        serving.base_url + path, json={**body, name: IGNORED_VALUES[name]}, timeout=60, headers=AUTH
    )
    assert plain.status_code == with_it.status_code == 200, with_it.text

    def texts(r):
        return [c.get("text") or c["message"]["content"] for c in r.json()["choices"]]

    assert texts(with_it) == texts(plain)


def test_every_honoured_field_names_a_test_that_exists():
    missing = []
    for table in parity.TABLES.values():
        for p in table:
            if p.support != "honoured":
                continue
            path, _, test = p.proof.partition("::")
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            if not test or not re.search(rf"^(async )?def {re.escape(test)}\(", source, re.M):
                missing.append((p.name, p.proof))
    assert not missing


def test_a_field_in_no_table_is_refused_too(serving):
    r = httpx.post(
        serving.base_url + "/v1/chat/completions",
        json={**_minimal("chat"), "frobnicate": True},
        timeout=60,
        headers=AUTH,
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == "frobnicate"


# -- sampling ----------------------------------------------------------------------------


def test_greedy_is_deterministic(client):
    a = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    b = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    assert a == b and a


def test_sampling_extras_reach_the_engine(client, tokenizer):
    greedy = ask(client, temperature=0, max_tokens=12).choices[0].message.content
    # Each of these leaves only the most likely token at every step: the greedy answer,
    # though the temperature says to sample.
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}):
        sampled = ask(client, temperature=1.0, seed=7, max_tokens=12, extra_body=extra)
        assert sampled.choices[0].message.content == greedy, extra
    # skip_special_tokens: a special token forced by a bias shows only when asked for.
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    forced = {"logit_bias": {str(user_id): 100}, "max_tokens": 2, "temperature": 0}
    hidden = ask(client, **forced).choices[0].message.content
    shown = ask(client, **forced, extra_body={"skip_special_tokens": False})
    assert "<|user|>" not in hidden
    assert shown.choices[0].message.content == "<|user|><|user|>"


def test_penalties_change_the_answer(client):
    """Forty tokens past the end of the answer (special tokens shown) repeat themselves:
    greedy, the frequency and repetition penalties make them repeat less; sampled under
    one seed, a presence penalty changes which tokens are drawn."""

    def tokens(**kw) -> list[str]:
        extra = {"ignore_eos": True, "skip_special_tokens": False, **kw.pop("extra_body", {})}
        kw = {"temperature": 0, **kw}
        r = ask(client, max_tokens=40, logprobs=True, extra_body=extra, **kw)
        return [t.token for t in r.choices[0].logprobs.content]

    def distinct(ts: list[str]) -> float:
        return len(set(ts)) / len(ts)

    plain = tokens()
    for kw in ({"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        changed = tokens(**kw)
        assert distinct(changed) > distinct(plain), (kw, plain, changed)
    for seed in (1, 2):
        sampled = tokens(temperature=1.0, seed=seed)
        assert tokens(temperature=1.0, seed=seed) == sampled  # the premise: seeds repeat
        assert tokens(temperature=1.0, seed=seed, presence_penalty=2.0) != sampled


def test_logit_bias_forces_a_token(client, tokenizer):
    [token_id] = tokenizer.encode(" the", add_special_tokens=False)
    r = ask(client, temperature=0, max_tokens=4, logit_bias={str(token_id): 100})
    assert r.choices[0].message.content == " the" * 4
    greedy = ask(client, temperature=0, max_tokens=1, logprobs=True)
    first = greedy.choices[0].logprobs.content[0].token
    [first_id] = tokenizer.encode(first, add_special_tokens=False)
    banned = ask(client, temperature=0, max_tokens=1, logit_bias={str(first_id): -100})
    assert banned.choices[0].message.content != first


def test_min_tokens_and_ignore_eos(client):
    r = ask(client, temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 30
    assert r.choices[0].finish_reason == "length"
    natural = ask(client, temperature=0, max_tokens=60)
    assert natural.choices[0].finish_reason == "stop"
    n = natural.usage.completion_tokens
    longer = ask(client, temperature=0, max_tokens=60, extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5


def test_stop_string_kept_on_request(client):
    full = ask(client, temperature=0, max_tokens=20).choices[0].message.content
    stop = full.split()[1]
    cut = ask(client, temperature=0, max_tokens=20, stop=[stop]).choices[0].message.content
    kept = (
        ask(
            client,
            temperature=0,
            max_tokens=20,
            stop=stop,
            extra_body={"include_stop_str_in_output": True},
        )
        .choices[0]
        .message.content
    )
    assert stop not in cut
    assert kept == cut + stop


def test_max_completion_tokens_caps_the_answer(client):
    r = ask(client, max_completion_tokens=3, max_tokens=50, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_text_modality_accepted(client):
    assert ask(client, modalities=["text"]).choices[0].message.content is not None
    with pytest.raises(BadRequestError) as e:
        ask(client, modalities=["text", "audio"])
    assert e.value.body["param"].startswith("modalities")


# -- logprobs ----------------------------------------------------------------------------


def test_logprobs_equal_the_engines(client, demo_model_dir, tokenizer):
    r = ask(client, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # Every generated token, the end-of-turn token that stopped the answer included.
    assert r.choices[0].finish_reason == "stop" and content[-1].token == "<|end|>"
    assert "".join(t.token for t in content[:-1]) == r.choices[0].message.content
    for t in content:
        assert [top.logprob for top in t.top_logprobs] == sorted(
            (top.logprob for top in t.top_logprobs), reverse=True
        )
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen one is the likeliest
        assert bytes(t.bytes).decode() == t.token
    # The same numbers from the model itself, outside the engine (float32 vs the engine's
    # bfloat16: a small tolerance).
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), torch_dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t.token))[0] for t in content]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    for k, (t, tid) in enumerate(zip(content, answer_ids, strict=True)):
        assert math.isclose(t.logprob, logp[len(prompt_ids) - 1 + k, tid].item(), abs_tol=0.08)

    streamed = list(ask(client, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3,
                        stream=True))  # fmt: skip
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]

    without = ask(client, temperature=0, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in without.choices[0].logprobs.content)
    assert ask(client, max_tokens=3).choices[0].logprobs is None


# -- structured outputs ----------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Fenwick", "Oslo", "Lima"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 1000},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "population", "sunny"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_validate(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    for seed in range(3):
        r = ask(client, response_format=fmt, max_tokens=60, seed=seed, stream=stream)
        text = (
            "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            if stream
            else r.choices[0].message.content
        )
        jsonschema.validate(json.loads(text), CITY)


def test_json_object_answers_parse(client):
    r = ask(client, response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the beginning of an object
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_invalid_json_schema_is_a_400(client):
    with pytest.raises(BadRequestError) as e:
        ask(
            client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )
    assert "JSON Schema" in e.value.body["message"]


# -- several choices, streamed -------------------------------------------------------------


def test_n_choices_stream_like_the_whole_answer(client):
    whole = ask(client, n=3, seed=11, max_tokens=12)
    chunks = list(ask(client, n=3, seed=11, max_tokens=12, stream=True))
    texts = {i: "" for i in range(3)}
    reasons = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.5},
        {"logit_bias": {"5": 5.0, "9": -5.0}},
        {"max_completion_tokens": 5},
        {"stop": ["e", "a"]},
        {"response_format": {"type": "json_object"}},
        {"extra_body": {"top_k": 3, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4}},
    ],
    ids=lambda f: ",".join(f.get("extra_body", f)),
)
def test_streamed_and_whole_answers_agree_for_each_parameter(client, fields):
    """Under one seed, a parameter shapes the streamed answer exactly as the whole one."""
    kw = {"temperature": 1.0, "seed": 123, "max_tokens": 24, **fields}
    whole = ask(client, **kw).choices[0]
    streamed = list(ask(client, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    reason = next(c.choices[0].finish_reason for c in reversed(streamed) if c.choices)
    assert (text, reason) == (whole.message.content, whole.finish_reason)


def test_continuous_usage_counts_tokens_as_they_stream(client):
    chunks = list(
        ask(
            client,
            stream=True,
            max_tokens=12,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices and c.usage]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens
    assert len(counts) >= 2
