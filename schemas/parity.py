"""The parity table: every request field of OpenAI's chat and completions APIs (and the
vLLM extras that matter), and what alignloop does with it.

*honoured*: the answer follows it; ``proof`` names the test that shows it.
*ignored*: accepted and ignored on purpose, because it cannot change an answer here.
*refused*: a 400 ``unsupported_parameter`` naming the field, with ``note`` saying why.

This table is data: `docs/api.md` shows it (generated; a test fails on drift), the error
for a refused field quotes its note, and a test walks it against the running server.
A field in no table is refused too, with a generic message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Support = Literal["honoured", "ignored", "refused"]
Endpoint = Literal["chat", "completions"]

_CHAT = "tests/integration/serving/test_chat_parity.py::"
_API = "tests/integration/serving/test_chat_api.py::"
_COMP = "tests/integration/serving/test_completions.py::"
_TOOLS = "tests/integration/serving/test_tool_calls.py::"


@dataclass(frozen=True)
class Parameter:
    name: str
    support: Support
    note: str = ""
    proof: str = ""
    source: Literal["openai", "vllm"] = "openai"


SAMPLING: tuple[Parameter, ...] = (
    # The fields both endpoints share (`schemas.sampling.SamplingFields`).
    Parameter(
        "model",
        "honoured",
        "the routed name or a policy version",
        _API + "test_models_lists_routed_name_and_base",
    ),
    Parameter("max_tokens", "honoured", "", _API + "test_n_choices_and_length_limit"),
    Parameter("temperature", "honoured", "0 to 2", _CHAT + "test_greedy_is_deterministic"),
    Parameter("top_p", "honoured", "", _CHAT + "test_sampling_extras_reach_the_engine"),
    Parameter("n", "honoured", "at most `max_n`", _API + "test_n_choices_and_length_limit"),
    Parameter(
        "stop",
        "honoured",
        "a string or up to 4; empty strings refused",
        _API + "test_stop_sequence_cuts_the_answer",
    ),
    Parameter(
        "seed",
        "honoured",
        "a 64-bit integer",
        _API + "test_stream_and_non_stream_agree_under_the_same_seed",
    ),
    Parameter(
        "presence_penalty", "honoured", "-2 to 2", _CHAT + "test_penalties_change_the_answer"
    ),
    Parameter(
        "frequency_penalty", "honoured", "-2 to 2", _CHAT + "test_penalties_change_the_answer"
    ),
    Parameter(
        "logit_bias",
        "honoured",
        "token id → bias in -100..100; ids must exist",
        _CHAT + "test_logit_bias_forces_a_token",
    ),
    Parameter(
        "user",
        "honoured",
        "sticky canary routing; recorded with the interaction",
        _API + "test_sync_round_trip",
    ),
    Parameter("stream", "honoured", "", _API + "test_streaming_round_trip_with_usage"),
    Parameter(
        "stream_options",
        "honoured",
        "`include_usage`; vLLM's `continuous_usage_stats`",
        _CHAT + "test_continuous_usage_counts_tokens_as_they_stream",
    ),
    Parameter("store", "ignored", "every interaction is logged for training anyway"),
    Parameter("metadata", "ignored", "not stored"),
    Parameter("service_tier", "ignored", "one tier"),
    Parameter("prompt_cache_key", "ignored", "vLLM caches prefixes by content"),
    Parameter("safety_identifier", "ignored", "use `user` for routing and feedback"),
    Parameter("top_k", "honoured", "", _CHAT + "test_sampling_extras_reach_the_engine", "vllm"),
    Parameter("min_p", "honoured", "", _CHAT + "test_sampling_extras_reach_the_engine", "vllm"),
    Parameter(
        "repetition_penalty",
        "honoured",
        "0 < p ≤ 2",
        _CHAT + "test_penalties_change_the_answer",
        "vllm",
    ),
    Parameter("min_tokens", "honoured", "", _CHAT + "test_min_tokens_and_ignore_eos", "vllm"),
    Parameter("ignore_eos", "honoured", "", _CHAT + "test_min_tokens_and_ignore_eos", "vllm"),
    Parameter(
        "skip_special_tokens",
        "honoured",
        "",
        _CHAT + "test_sampling_extras_reach_the_engine",
        "vllm",
    ),
    Parameter(
        "include_stop_str_in_output",
        "honoured",
        "",
        _CHAT + "test_stop_string_kept_on_request",
        "vllm",
    ),
    Parameter("stop_token_ids", "refused", "use `stop` strings", source="vllm"),
    Parameter("bad_words", "refused", "use `logit_bias`", source="vllm"),
    Parameter("allowed_token_ids", "refused", "use `logit_bias`", source="vllm"),
    Parameter("use_beam_search", "refused", "sampling only", source="vllm"),
    Parameter("length_penalty", "refused", "beam search only", source="vllm"),
    Parameter("priority", "refused", "one scheduling class", source="vllm"),
    Parameter("request_id", "refused", "the response id is the server's", source="vllm"),
    Parameter("prompt_logprobs", "refused", "not served", source="vllm"),
    Parameter("structured_outputs", "refused", "use `response_format`", source="vllm"),
    Parameter("guided_json", "refused", "use `response_format`", source="vllm"),
    Parameter(
        "truncate_prompt_tokens",
        "refused",
        "an over-long prompt is a 400, never cut silently",
        source="vllm",
    ),
    Parameter("spaces_between_special_tokens", "refused", "", source="vllm"),
)


CHAT: tuple[Parameter, ...] = (
    Parameter(
        "messages",
        "honoured",
        "system, developer, user, assistant (with `tool_calls`), tool; text content only",
        _API + "test_sync_round_trip",
    ),
    *SAMPLING,
    Parameter(
        "max_completion_tokens",
        "honoured",
        "wins over `max_tokens`",
        _CHAT + "test_max_completion_tokens_caps_the_answer",
    ),
    Parameter(
        "logprobs", "honoured", "the engine's own values", _CHAT + "test_logprobs_equal_the_engines"
    ),
    Parameter(
        "top_logprobs",
        "honoured",
        "0 to 20; needs `logprobs`",
        _CHAT + "test_logprobs_equal_the_engines",
    ),
    Parameter(
        "response_format",
        "honoured",
        "`text`, `json_object`, `json_schema` (vLLM structured outputs)",
        _CHAT + "test_json_schema_answers_validate",
    ),
    Parameter(
        "tools",
        "honoured",
        "functions, rendered by the model's chat template",
        _TOOLS + "test_auto_tool_call_round_trip",
    ),
    Parameter(
        "tool_choice",
        "honoured",
        "`none`, `auto`, `required`, a named function",
        _TOOLS + "test_required_and_named_choices_call_a_tool",
    ),
    Parameter(
        "parallel_tool_calls",
        "honoured",
        "false: at most one call",
        _TOOLS + "test_required_and_named_choices_call_a_tool",
    ),
    Parameter(
        "modalities",
        "honoured",
        '`["text"]` only; anything else is a 400',
        _CHAT + "test_text_modality_accepted",
    ),
    Parameter("prediction", "ignored", "a latency hint; answers are the same without it"),
    Parameter("audio", "refused", "text models only"),
    Parameter("functions", "refused", "deprecated by OpenAI: use `tools`"),
    Parameter("function_call", "refused", "deprecated by OpenAI: use `tool_choice`"),
    Parameter("reasoning_effort", "refused", "the models served here do not reason separately"),
    Parameter("verbosity", "refused", "reasoning models only"),
    Parameter("web_search_options", "refused", "no search tool"),
    Parameter("chat_template", "refused", "the model's own template is used", source="vllm"),
    Parameter("chat_template_kwargs", "refused", "", source="vllm"),
    Parameter("add_generation_prompt", "refused", "always on", source="vllm"),
    Parameter("continue_final_message", "refused", "", source="vllm"),
    Parameter("echo", "refused", "chat answers never echo the prompt", source="vllm"),
)

COMPLETIONS: tuple[Parameter, ...] = (
    Parameter(
        "prompt",
        "honoured",
        "a string, or a list of one string",
        _COMP + "test_completion_round_trip_and_feedback",
    ),
    *SAMPLING,
    Parameter("echo", "honoured", "", _COMP + "test_echo_and_logprobs"),
    Parameter("logprobs", "honoured", "0 to 5 (legacy shape)", _COMP + "test_echo_and_logprobs"),
    Parameter("best_of", "honoured", "only equal to `n`", _COMP + "test_echo_and_logprobs"),
    Parameter("suffix", "refused", "no fill-in-the-middle"),
)

TABLES: dict[Endpoint, tuple[Parameter, ...]] = {"chat": CHAT, "completions": COMPLETIONS}


def lookup(endpoint: Endpoint, name: str) -> Parameter | None:
    return next((p for p in TABLES[endpoint] if p.name == name), None)


def refusal_message(endpoint: Endpoint, name: str) -> str:
    """The 400's message for a field the request model does not declare."""
    p = lookup(endpoint, name)
    why = f" ({p.note})" if p is not None and p.note else ""
    return f"Unsupported parameter: '{name}' is not supported by this server{why}."


START, END = "<!-- parity table: generated -->", "<!-- end of parity table -->"
REGENERATE = "./dev run python -m schemas.parity"


def markdown() -> str:
    """The tables as `docs/api.md` shows them, between the ``START``/``END`` markers."""
    lines = [START, "", f"_Generated from `schemas/parity.py` by `{REGENERATE}`._", ""]
    titles = {"chat": "`POST /v1/chat/completions`", "completions": "`POST /v1/completions`"}
    for endpoint, table in TABLES.items():
        lines += [f"**{titles[endpoint]}**", "", "| field | from | support | notes | proof |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for p in table:
            proof = f"`{p.proof.rpartition('/')[2]}`" if p.proof else ""
            note = p.note.replace("|", "\\|")
            lines.append(f"| `{p.name}` | {p.source} | {p.support} | {note} | {proof} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def rewrite(page: str) -> str:
    """``page`` with its generated section replaced by the current `markdown`."""
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return head + markdown() + tail


if __name__ == "__main__":
    from pathlib import Path

    api = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    api.write_text(rewrite(api.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the parity table in {api}")
