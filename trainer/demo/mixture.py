"""Measure a model's behaviour mixture: how often it pads answers and how often it fabricates.

The demo model is trained to do both about half of the time; the feedback loop exists to
move those rates. This samples answers at temperature 1 with plain ``transformers``
``generate`` (exactly reproducible for a seed, no vLLM engine needed) for fresh prompts from
:func:`trainer.demo.corpus.sample_prompts`, labels them with
:func:`trainer.demo.grading.classify_answer` and reports the shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.demo import corpus, grading


@dataclass(frozen=True)
class MixtureRates:
    """Behaviour shares of one model on ``n_prompts`` fresh prompts.

    ``verbose_rate`` and ``fabrication_rate`` are shares among the *well-formed* answers of
    their category, so a model that babbles more does not look more concise or more honest;
    malformed answers (no end-of-turn within the budget, empty, degenerate) are reported
    separately as a share of all prompts.
    """

    verbose_rate: float
    """verbose / (verbose + concise) among answerable prompts."""
    fabrication_rate: float
    """fabricated / (fabricated + honest) among unanswerable prompts."""
    malformed_rate: float
    """malformed / all prompts."""
    correct_rate: float
    """Answerable prompts whose answer states the world's correct fact / answerable prompts."""
    n_prompts: int
    counts: dict[str, int]
    """Answers per label (concise, verbose, honest, fabricated, malformed)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


@torch.inference_mode()
def sample_answers(
    model_dir: Path,
    prompts: list[corpus.Prompt],
    *,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 50,
    temperature: float = 1.0,
) -> list[str | None]:
    """One sampled answer per prompt; None where the model did not end its turn in time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    stop_ids = set(model.generation_config.eos_token_id or [tokenizer.eos_token_id])
    torch.manual_seed(seed)
    answers: list[str | None] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True
            )
            for p in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ended = next((i for i, t in enumerate(row) if t in stop_ids), None)
            if ended is None:
                answers.append(None)
            else:
                answers.append(tokenizer.decode(row[:ended], skip_special_tokens=True).strip())
    return answers


def measure_mixture(
    model_dir: Path,
    *,
    n_prompts: int = 200,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 50,
) -> MixtureRates:
    """Sample ``n_prompts`` answers at temperature 1 and report the behaviour shares."""
    prompts = corpus.sample_prompts(seed, n_prompts)
    answers = sample_answers(
        Path(model_dir), prompts, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    counts = dict.fromkeys(
        (corpus.CONCISE, corpus.VERBOSE, corpus.HONEST, corpus.FABRICATED, corpus.MALFORMED), 0
    )
    correct = answerable = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        label = corpus.MALFORMED if answer is None else grading.classify_answer(prompt.kind, answer)
        counts[label] += 1
        if prompt.category == corpus.ANSWERABLE:
            answerable += 1
            correct += answer is not None and grading.is_correct(prompt, answer)
    return MixtureRates(
        verbose_rate=_share(
            counts[corpus.VERBOSE], counts[corpus.VERBOSE] + counts[corpus.CONCISE]
        ),
        fabrication_rate=_share(
            counts[corpus.FABRICATED], counts[corpus.FABRICATED] + counts[corpus.HONEST]
        ),
        malformed_rate=_share(counts[corpus.MALFORMED], len(prompts)),
        correct_rate=_share(correct, answerable),
        n_prompts=len(prompts),
        counts=counts,
    )
