"""Tool calling: what the engine is asked to write, and how its text becomes tool calls.

Three ways, by ``tool_choice``:
- ``none``: the tools are not shown to the model; the answer is text.
- a named function, or ``required``: the answer is constrained by structured outputs to
  the JSON the call needs (the function's arguments; or a list of ``{name, parameters}``),
  so a call always comes back, parsed here without a model-specific parser.
- ``auto``: the tools are rendered by the model's chat template and the model decides;
  a vLLM tool-call parser (``Settings.tool_call_parser``, e.g. ``hermes`` for
  ``<tool_call>{json}</tool_call>``) finds calls in its text.

``parallel_tool_calls: false`` keeps one call. Streaming holds back text that could be
the start of a call (`StreamHold`), so a call is never half-sent as content; its calls
are sent whole when the choice finishes.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from schemas.chat import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

if TYPE_CHECKING:
    from vllm.tool_parsers.abstract_tool_parser import ToolParser

Mode = Literal["none", "auto", "required", "named"]
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolPlan:
    """What one request asked of tools, decided once in `plan`."""

    mode: Mode
    tools: list[dict[str, Any]] = field(default_factory=list)  # as chat templates take them
    parallel: bool = True
    named: str | None = None

    def render_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model (none when it may not call one)."""
        return self.tools if self.mode != "none" and self.tools else None

    def constrained_json(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must match (named / required), else None."""
        if self.mode == "named":
            fn = next(t["function"] for t in self.tools if t["function"]["name"] == self.named)
            return fn.get("parameters") or _ANY_OBJECT
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t["function"]["name"]]},
                        "parameters": t["function"].get("parameters") or _ANY_OBJECT,
                    },
                    "required": ["name", "parameters"],
                }
                for t in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            return schema
        return None


def plan(req: ChatCompletionRequest) -> ToolPlan:
    choice = req.effective_tool_choice()
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if isinstance(choice, NamedToolChoice):
        return ToolPlan("named", tools, req.parallel_tool_calls, choice.function.name)
    return ToolPlan(choice, tools, req.parallel_tool_calls)


@dataclass
class Parsed:
    content: str | None
    tool_calls: list[ToolCall]


def parse(plan: ToolPlan, text: str, parser_name: str, tokenizer: Any) -> Parsed:
    """A finished answer's text as content and tool calls."""
    if plan.mode == "none":
        return Parsed(text, [])
    if plan.mode == "named":
        assert plan.named is not None
        return Parsed(None, [_call(plan.named, _as_json_text(text))])
    if plan.mode == "required":
        calls = [_call(i["name"], json.dumps(i["parameters"])) for i in _complete_items(text)]
        if not calls:  # cut short (length) before one call was complete: text, no call
            return Parsed(text, [])
        return Parsed(None, calls[:1] if not plan.parallel else calls)
    return _parse_auto(plan, text, parser_name, tokenizer)


def _parse_auto(plan: ToolPlan, text: str, parser_name: str, tokenizer: Any) -> Parsed:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VllmRequest,
    )

    parser = parser_class(parser_name)(tokenizer)
    request = VllmRequest.model_validate(
        {"model": "-", "messages": [], "tools": plan.tools, "tool_choice": "auto"}
    )
    info = parser.extract_tool_calls(text, request)
    if not info.tools_called:
        return Parsed(text, [])
    known = {t["function"]["name"] for t in plan.tools}
    calls = [
        _call(c.function.name, c.function.arguments)
        for c in info.tool_calls
        if c.function.name in known  # a call to a function nobody offered stays text
    ]
    if not calls:
        return Parsed(text, [])
    return Parsed(info.content or None, calls[:1] if not plan.parallel else calls)


@cache
def parser_class(name: str) -> type[ToolParser]:
    """A vLLM tool-call parser by name (``KeyError`` if vLLM has none by that name)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser(name)


def start_marker(parser_name: str) -> str | None:
    """The text a call starts with in the model's format, if the parser declares one."""
    return getattr(parser_class(parser_name), "tool_call_start_token", None)


def _complete_items(text: str) -> list[dict[str, Any]]:
    """The complete ``{name, parameters}`` objects of a JSON array, even when the array
    was cut short by ``max_tokens`` (a small model may keep adding calls until then)."""
    decoder = json.JSONDecoder()
    items: list[dict[str, Any]] = []
    at = text.find("[") + 1
    if at == 0:
        return items
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError:
            return items
        if isinstance(item, dict) and "name" in item and "parameters" in item:
            items.append(item)


def marker_is_special(parser_name: str, tokenizer: Any) -> bool:
    """Whether the model writes the start of a call as a special token (Qwen-style models
    may), which decoding would otherwise drop before the parser sees it."""
    marker = start_marker(parser_name)
    return marker is not None and marker in getattr(tokenizer, "all_special_tokens", ())


def _as_json_text(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text  # cut short by max_tokens: the client sees what was written


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


class StreamHold:
    """Decides, for one streamed choice, how much of its text may go out as content.

    ``named``/``required`` answers are JSON for a call: nothing goes out as content.
    ``auto``: text goes out until the start marker (or what could be its beginning)
    appears; from there on it is held for the parser at the end.
    """

    def __init__(self, plan: ToolPlan, marker: str | None) -> None:
        self.plan = plan
        self.marker = marker
        self.sent = 0

    def sendable(self, text: str) -> str:
        if self.plan.mode in ("named", "required"):
            return ""
        if self.plan.mode == "none":
            out, self.sent = text[self.sent :], len(text)
            return out
        if self.marker is None:
            return ""  # no known marker: hold everything until the parser has run
        at = text.find(self.marker)
        if at < 0:
            at = len(text) - _overlap(text, self.marker)
        at = max(at, self.sent)
        out, self.sent = text[self.sent : at], at
        return out


def _overlap(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
