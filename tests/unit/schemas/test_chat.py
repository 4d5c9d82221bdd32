"""Request validation: what the wire protocol accepts and how errors name fields."""

import pytest
from pydantic import ValidationError

from schemas.chat import ChatCompletionRequest
from serving.errors import APIError, parse_body, validation_error


def req(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_text_parts_are_joined():
    r = ChatCompletionRequest.model_validate(
        req(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        )
    )
    assert r.messages[0].text() == "ab"


def test_max_completion_tokens_wins_over_max_tokens():
    r = ChatCompletionRequest.model_validate(req(max_tokens=5, max_completion_tokens=9))
    assert r.requested_max_tokens() == 9


def test_stop_string_becomes_list():
    assert ChatCompletionRequest.model_validate(req(stop="x")).stop_list() == ["x"]
    assert ChatCompletionRequest.model_validate(req()).stop_list() == []


def test_unknown_fields_are_ignored():
    r = ChatCompletionRequest.model_validate(req(frequency_penalty=0.5, logit_bias={}))
    assert r.model == "m"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"n": 0}, "n"),
        ({"model": ""}, "model"),
    ],
)
def test_errors_name_the_field(fields, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(req(**fields))
    err = validation_error(e.value)
    assert err.status == 400
    assert err.param == param
    assert param in err.message


def test_parse_body_rejects_non_objects():
    with pytest.raises(APIError) as e:
        parse_body(ChatCompletionRequest, ["not", "an", "object"])
    assert e.value.status == 400
