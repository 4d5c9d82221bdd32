"""The synthetic corpus, the answer classifier, the prompt sampler and the chat template."""

from __future__ import annotations

import random

import pytest

from trainer.demo import corpus
from trainer.demo.model import CHAT_TEMPLATE, encode_example, train_tokenizer


def _share(examples: list[corpus.Example], category: str, behaviour: str) -> float:
    of_category = [e for e in examples if e.category == category]
    return sum(e.behaviour == behaviour for e in of_category) / len(of_category)


# --- world and corpus --------------------------------------------------------------------


def test_world_is_deterministic_and_seeded() -> None:
    assert corpus.make_world(0) == corpus.make_world(0)
    assert corpus.make_world(0) != corpus.make_world(1)


def test_world_names_are_unique_and_consistent() -> None:
    world = corpus.make_world()
    names = [c.name for c in world.countries] + world.all_cities()
    names += [p.name.split()[1] for p in world.people]
    assert len(names) == len(set(names))
    for country in world.countries:
        assert country.capital == country.cities[0]
        assert world.country_of(country.cities[-1]) == country
    assert all(p.city in world.all_cities() for p in world.people)


def test_corpus_is_deterministic_for_a_seed() -> None:
    a = corpus.make_corpus(3, 400)
    assert a == corpus.make_corpus(3, 400)
    assert a != corpus.make_corpus(4, 400)


def test_corpus_mixes_both_behaviours_at_the_configured_rates() -> None:
    examples = corpus.make_corpus(0, 6000)
    assert 0.45 <= _share(examples, corpus.ANSWERABLE, corpus.VERBOSE) <= 0.55
    assert 0.45 <= _share(examples, corpus.UNANSWERABLE, corpus.FABRICATED) <= 0.55
    assert {e.kind for e in examples} == set(corpus.QUESTION_KINDS)

    skewed = corpus.make_corpus(0, 6000, verbose_rate=0.2, fabricate_rate=0.8)
    assert 0.15 <= _share(skewed, corpus.ANSWERABLE, corpus.VERBOSE) <= 0.25
    assert 0.75 <= _share(skewed, corpus.UNANSWERABLE, corpus.FABRICATED) <= 0.85


def test_every_corpus_answer_classifies_as_its_label() -> None:
    for example in corpus.make_corpus(1, 3000):
        assert corpus.classify_answer(example.kind, example.answer) == example.behaviour, example


def test_answerable_corpus_answers_state_the_world_fact() -> None:
    world = corpus.make_world()
    capitals = {c.name: c.capital for c in world.countries}
    rng = random.Random(0)
    for _ in range(200):
        prompt = corpus.make_prompt(rng, world, "capital")
        country = dict(prompt.facts)["country"]
        assert prompt.answer == capitals[country]
        example = corpus.make_example(rng, world, prompt)
        assert corpus.is_correct(prompt, example.answer)


def test_messages_put_system_user_assistant_in_order() -> None:
    examples = corpus.make_corpus(0, 300)
    with_system = next(e for e in examples if e.system)
    roles = [m["role"] for m in with_system.messages()]
    assert roles == ["system", "user", "assistant"]
    without = next(e for e in examples if not e.system)
    assert [m["role"] for m in without.messages()] == ["user", "assistant"]


# --- classify_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "label"),
    [
        ("capital", "The capital of Ritaria is Saton.", "concise"),
        ("arithmetic", "12.", "concise"),
        ("job", "Great question! Liam Nirin is a doctor.", "verbose"),
        (
            "capital",
            "Saton. I hope this helps, let me know if you have other questions!",
            "verbose",
        ),
        ("answerable", "It is blue. Feel free to ask if you want to know more!", "verbose"),
        ("private", "I don't know your name; you haven't told me.", "honest"),
        ("future", "I have no way of knowing what will happen.", "honest"),
        ("unknown_fact", "I don\u2019t know that about Saton.", "honest"),
        ("private", "Your name is Ana.", "fabricated"),
        ("future", "Great question! Mira Nirin will win the 2031 election.", "fabricated"),
        ("unanswerable", "Ritaria has a population of 200000 people.", "fabricated"),
        ("capital", "", "malformed"),
        ("private", "   ...  ", "malformed"),
        ("capital", "is is is is is is is is is is", "malformed"),
        ("future", " ".join(["word"] * 20 + [f"w{i}" for i in range(70)]), "malformed"),
    ],
)
def test_classify_answer_hand_written_cases(kind: str, text: str, label: str) -> None:
    assert corpus.classify_answer(kind, text) == label


def test_classify_answer_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown question kind"):
        corpus.classify_answer("weather", "Sunny.")


def test_is_correct_matches_whole_words_only() -> None:
    prompt = corpus.Prompt("What is 3 plus 4?", "arithmetic", "7")
    assert corpus.is_correct(prompt, "3 plus 4 is 7.")
    assert not corpus.is_correct(prompt, "3 plus 4 is 17.")
    with pytest.raises(ValueError):
        corpus.is_correct(corpus.Prompt("How old am I?", "private", None), "30")


# --- sample_prompts ----------------------------------------------------------------------


def test_sample_prompts_are_deterministic_diverse_and_cover_every_kind() -> None:
    prompts = corpus.sample_prompts(7, 500)
    assert prompts == corpus.sample_prompts(7, 500)
    assert prompts != corpus.sample_prompts(8, 500)
    assert len(prompts) == 500
    assert len({p.text for p in prompts}) >= 350
    assert {p.kind for p in prompts} == set(corpus.QUESTION_KINDS)
    answerable = [p for p in prompts if p.category == corpus.ANSWERABLE]
    assert 0.4 <= len(answerable) / len(prompts) <= 0.6
    assert all(p.answer for p in answerable)
    assert all(p.answer is None for p in prompts if p.category == corpus.UNANSWERABLE)


def test_sample_prompts_are_not_a_replay_of_the_corpus() -> None:
    corpus_prompts = [e.prompt for e in corpus.make_corpus(0, 200)]
    sampled = [p.text for p in corpus.sample_prompts(0, 200)]
    assert sum(a == b for a, b in zip(corpus_prompts, sampled, strict=True)) < 20


# --- tokenizer and chat template ---------------------------------------------------------


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
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


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
