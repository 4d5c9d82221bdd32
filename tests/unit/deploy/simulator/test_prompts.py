"""Prompt sources: built-in templates are varied, tagged, about the demo world and never
the corpus' own sentences; JSONL files load in both shapes and bad ones fail clearly."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from deploy.simulator.prompts import (
    ANSWERABLE_TEMPLATES,
    UNANSWERABLE_TEMPLATES,
    BuiltinPrompts,
    FilePrompts,
    PromptFileError,
    load_jsonl,
    make_source,
)
from trainer.demo.corpus import make_world, sample_prompts


def draw(n: int, seed: int = 0, **kw) -> list:
    source = BuiltinPrompts(**kw)
    rng = random.Random(seed)
    return [source.draw(rng) for _ in range(n)]


def test_builtin_prompts_are_not_the_corpus_sentences() -> None:
    ours = {p.text for p in draw(3000)}
    corpus = {p.text for p in sample_prompts(0, 5000)}
    assert not ours & corpus
    # nor are any of our bare phrasings (before greetings) one of the corpus' sentences
    bare = {p.text.removesuffix(" Thanks.").removesuffix(" Thank you!") for p in draw(3000)}
    assert not bare & corpus


def test_builtin_prompts_are_varied_and_tagged() -> None:
    prompts = draw(2000, answerable_share=0.5)
    kinds = Counter(p.kind for p in prompts)
    assert set(kinds) == set(ANSWERABLE_TEMPLATES) | set(UNANSWERABLE_TEMPLATES)
    assert len({p.text for p in prompts}) > 1000
    share = sum(p.answerable for p in prompts) / len(prompts)
    assert abs(share - 0.5) < 0.05
    for p in prompts:
        assert p.answerable is (p.kind in ANSWERABLE_TEMPLATES)
        assert p.messages[-1][0] == "user" and "{" not in p.text
    assert any(p.messages[0][0] == "system" for p in prompts)


def test_answerable_share_is_configurable() -> None:
    assert all(p.answerable for p in draw(200, answerable_share=1.0))
    assert not any(p.answerable for p in draw(200, answerable_share=0.0))
    with pytest.raises(ValueError):
        BuiltinPrompts(answerable_share=1.2)


def test_builtin_prompts_name_the_demo_world() -> None:
    world = make_world()
    names = [c.name for c in world.countries] + world.all_cities()
    names += [p.name for p in world.people]
    about_world = [p for p in draw(500) if p.kind in ("capital", "job", "residence")]
    assert about_world and all(any(n in p.text for n in names) for p in about_world)


def test_same_seed_same_prompts() -> None:
    assert draw(50, seed=3) == draw(50, seed=3) != draw(50, seed=4)


def write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_both_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"prompt": "What is 2 plus 2?", "answerable": True, "kind": "maths"},
            "",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Who wins the cup in 2050?"},
                ],
                "answerable": False,
                "prompt_hash": "ignored",  # exported datasets carry extra keys
            },
            {"messages": [{"role": "user", "content": "Hello?"}]},
        ],
    )
    a, b, c = load_jsonl(path)
    assert a.messages == (("user", "What is 2 plus 2?"),) and a.answerable is True
    assert a.kind == "maths"
    assert b.text == "Who wins the cup in 2050?" and b.answerable is False
    assert b.wire_messages()[0] == {"role": "system", "content": "Be brief."}
    assert c.answerable is None and c.kind == "file"
    source = make_source(path)
    assert isinstance(source, FilePrompts)
    rng = random.Random(0)
    assert {source.draw(rng).text for _ in range(200)} == {a.text, b.text, c.text}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r":1: not valid JSON"),
        ("[1, 2]", r":1: each line must be a JSON object, got list"),
        ({}, r":1: give exactly one of 'messages' or 'prompt'"),
        ({"prompt": "a", "messages": []}, r"give exactly one of"),
        ({"prompt": "  "}, r"'prompt' must be a non-empty string"),
        ({"messages": []}, r"'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"role 'robot' is not one of"),
        ({"messages": [{"role": "user", "content": 3}]}, r"content must be a non-empty string"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            r"the last message must be the user's",
        ),
        ({"prompt": "q", "answerable": "yes"}, r"'answerable' must be true, false or absent"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line, message: str) -> None:
    path = write(tmp_path, [line])
    with pytest.raises(PromptFileError, match=message) as info:
        load_jsonl(path)
    assert str(path) in str(info.value)


def test_jsonl_error_on_a_later_line(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "ok"}, {"prompt": "ok too"}, {"prompt": ""}])
    with pytest.raises(PromptFileError, match=r"prompts.jsonl:3: 'prompt'"):
        load_jsonl(path)


def test_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PromptFileError, match="no prompts in the file"):
        load_jsonl(empty)
    with pytest.raises(PromptFileError, match="cannot read it"):
        load_jsonl(tmp_path / "missing.jsonl")
