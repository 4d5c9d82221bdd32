"""The demo world, its corpus and its prompt sampler: deterministic for a seed, mixing both
behaviours at the configured rates."""

from __future__ import annotations

import random

from trainer.demo import corpus, grading


def _share(examples: list[corpus.Example], category: str, behaviour: str) -> float:
    of_category = [e for e in examples if e.category == category]
    return sum(e.behaviour == behaviour for e in of_category) / len(of_category)


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
        assert grading.classify_answer(example.kind, example.answer) == example.behaviour, example


def test_answerable_corpus_answers_state_the_world_fact() -> None:
    world = corpus.make_world()
    capitals = {c.name: c.capital for c in world.countries}
    rng = random.Random(0)
    for _ in range(200):
        prompt = corpus.make_prompt(rng, world, "capital")
        country = dict(prompt.facts)["country"]
        assert prompt.answer == capitals[country]
        example = corpus.make_example(rng, world, prompt)
        assert grading.is_correct(prompt, example.answer)


def test_messages_put_system_user_assistant_in_order() -> None:
    examples = corpus.make_corpus(0, 300)
    with_system = next(e for e in examples if e.system)
    roles = [m["role"] for m in with_system.messages()]
    assert roles == ["system", "user", "assistant"]
    without = next(e for e in examples if not e.system)
    assert [m["role"] for m in without.messages()] == ["user", "assistant"]


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
