"""Tests of :mod:`trainer.demo.model`."""

from __future__ import annotations

import pytest

from trainer.demo import corpus
from trainer.demo.model import CHAT_TEMPLATE, encode_example, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    examples = corpus.make_corpus(0, 1000)
    texts = [t for e in examples for t in (e.system or "", e.prompt, e.answer) if t]
    return train_tokenizer(texts, 512)


def test_chat_template_renders_every_role(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "No filler."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And 3 "}, {"type": "text", "text": "plus 3?"}],
        },
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>Be brief.<|end|><|system|>No filler.<|end|>"
        "<|user|>What is 2 plus 2?<|end|><|assistant|>4.<|end|>"
        "<|user|>And 3 plus 3?<|end|><|assistant|>"
    )
    closed = tokenizer.apply_chat_template(messages[:4], tokenize=False)
    assert closed.endswith("<|assistant|>4.<|end|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_rejects_unknown_roles(tokenizer) -> None:
    with pytest.raises(Exception, match="unsupported role"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_chat_template_renders_tools_calls_and_results_in_hermes_format(tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "tool", "content": "4 C", "tool_call_id": "call_1"},
    ]
    rendered = tokenizer.apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|bos|><|system|>You may call these functions.")
    assert '<tools>{"type": "function", "function": {"name": "weather"' in rendered
    assert rendered.endswith(
        "<|user|>Weather in Oslo?<|end|>"
        '<|assistant|><tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
        "<|end|><|user|><tool_response>4 C</tool_response><|end|><|assistant|>"
    )
    # What the template writes for a call is what vLLM's hermes parser reads back.
    from vllm.tool_parsers import ToolParserManager

    parser = ToolParserManager.get_tool_parser("hermes")(tokenizer)
    call_text = rendered.split("<|assistant|>")[1].removesuffix("<|end|><|user|>")
    info = parser.extract_tool_calls(call_text.split("<|end|>")[0], None)
    assert info.tools_called
    assert info.tool_calls[0].function.name == "weather"
    assert info.tool_calls[0].function.arguments == '{"city": "Oslo"}'


def test_special_tokens_are_single_ids_and_text_round_trips(tokenizer) -> None:
    for token in ("<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.eos_token == "<|end|>"
    text = "Ünïcode ✓ and 'quotes' work: 12 * 3?"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_training_ids_equal_the_template_and_mask_all_but_the_answer(tokenizer) -> None:
    for example in corpus.make_corpus(5, 50):
        ids, labels = encode_example(tokenizer, example)
        rendered = tokenizer.apply_chat_template(example.messages(), tokenize=False)
        assert ids == tokenizer.encode(rendered, add_special_tokens=False)
        learned = [t for t in labels if t != -100]
        assert tokenizer.decode(learned) == example.answer + "<|end|>"
        assert labels[: len(ids) - len(learned)] == [-100] * (len(ids) - len(learned))
