"""Tool planning and parsing, on hand-written answers."""

import json

import pytest

from schemas.chat import ChatCompletionRequest
from serving import tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def plan_of(**fields) -> tools.ToolPlan:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return tools.plan(ChatCompletionRequest.model_validate(body))


def test_default_choice_is_auto_with_tools_and_none_without():
    assert plan_of(tools=[WEATHER]).mode == "auto"
    assert plan_of().mode == "none"
    assert plan_of(tools=[WEATHER], tool_choice="none").render_tools() is None


def test_required_schema_lists_each_function_and_caps_parallel_calls():
    schema = plan_of(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    forced = schema.constrained_json()
    assert forced["minItems"] == 1 and forced["maxItems"] == 1
    [call] = forced["items"]["anyOf"]
    assert call["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert call["properties"]["parameters"] == WEATHER["function"]["parameters"]


def test_named_choice_constrains_to_the_functions_parameters():
    named = plan_of(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.constrained_json() == WEATHER["function"]["parameters"]
    parsed = tools.parse(named, '{"city": "Oslo"}', "hermes", None)
    [call] = parsed.tool_calls
    assert parsed.content is None
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )


def test_required_keeps_the_complete_calls_of_a_list_cut_short():
    required = plan_of(tools=[WEATHER], tool_choice="required")
    text = (
        '[{"name":"get_weather","parameters":{"city":"Oslo"}},'
        '{"name":"get_weather","parameters":{"ci'
    )
    parsed = tools.parse(required, text, "hermes", None)
    assert [json.loads(c.function.arguments) for c in parsed.tool_calls] == [{"city": "Oslo"}]
    assert tools.parse(required, '[{"name":"get_wea', "hermes", None).tool_calls == []


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        ("It is sunny.", "It is sunny.", []),
        (
            'Let me look.<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}</tool_call>',
            "Let me look.",
            ["get_weather"],
        ),
        (
            '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
            [],
        ),
    ],
)
def test_auto_answers_are_parsed_by_the_hermes_parser(text, content, names):
    parsed = tools.parse(plan_of(tools=[WEATHER]), text, "hermes", object())  # any tokenizer
    assert parsed.content == content
    assert [c.function.name for c in parsed.tool_calls] == names


def test_stream_hold_keeps_back_what_could_start_a_call():
    hold = tools.StreamHold(plan_of(tools=[WEATHER]), "<tool_call>")
    assert hold.sendable("Hello") == "Hello"
    assert hold.sendable("Hello <tool") == " "  # "<tool" may begin a call
    assert hold.sendable("Hello <tool_call>{") == ""
    assert hold.sent == len("Hello ")
    forced = tools.StreamHold(plan_of(tools=[WEATHER], tool_choice="required"), None)
    assert forced.sendable('[{"name"') == ""


def test_special_tokens_are_kept_only_when_the_call_marker_is_one():
    class Tokenizer:
        def __init__(self, special: list[str]) -> None:
            self.all_special_tokens = special

    assert not tools.marker_is_special("hermes", Tokenizer(["<|end|>"]))
    assert tools.marker_is_special("hermes", Tokenizer(["<|end|>", "<tool_call>"]))
