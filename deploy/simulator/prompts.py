"""What the simulated users ask: built-in templates, or prompts from a JSONL file.

Contract. A prompt source has ``draw(rng) -> SimPrompt``; a :class:`SimPrompt` is the
``messages`` to send (ending with a user turn) and its tag ``answerable`` (True: the
question has a right answer; False: nobody can know it; None: untagged), which hidden
preferences such as ``honest`` read. Sources are pure: the randomness is the caller's.

* :class:`BuiltinPrompts`: templates in their own phrasings (deliberately *not* the demo
  corpus' sentences, so the loop is tested on traffic it was not pre-trained on), filled
  with the names of the demo model's invented world (``trainer.demo.corpus.make_world``: its
  countries, cities and people) or any other :class:`~trainer.demo.corpus.World`; varied further
  by greetings, sign-offs and an occasional system prompt. Every kind is tagged.
* :func:`load_jsonl`: one JSON object per line, ``{"messages": [...]}`` or
  ``{"prompt": "..."}``, with optional ``"answerable": true|false`` and ``"kind"``; other
  keys are ignored (so ``alignloop data export prompts`` output loads as is). Blank lines
  are skipped; anything else malformed is a :class:`PromptFileError` naming the file and
  line. :class:`FilePrompts` draws from the loaded list uniformly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from trainer.demo.corpus import World

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class SimPrompt:
    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs; the last one is the user's question."""
    answerable: bool | None
    kind: str = "file"

    @property
    def text(self) -> str:
        """The user's question (the last message)."""
        return self.messages[-1][1]

    def wire_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


class PromptSource(Protocol):
    def draw(self, rng: random.Random) -> SimPrompt: ...


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and the line."""


# --- built-in templates ---------------------------------------------------------------------

# kind -> phrasings. Slots: {c} country, {city}, {p} person, {a} {b} numbers, {op} word
# operator, {sym} symbol, {t} thing, {T} thing capitalised, {y} year, {d} weekday.
ANSWERABLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "Do you know the capital of {c}?",
        "I need the capital city of {c}.",
        "Could you tell me what the capital of {c} is?",
        "Which city serves as the capital of {c}?",
        "Capital of {c}?",
        "What city is {c}'s capital?",
    ),
    "city_country": (
        "I'm planning a trip to {city}. Which country is that in?",
        "Could you tell me which country {city} belongs to?",
        "Do you know what country {city} is located in?",
        "{city} is in what country?",
        "Which nation is {city} part of?",
    ),
    "job": (
        "Do you know what {p} does for work?",
        "What line of work is {p} in?",
        "I'm meeting {p} tomorrow. What is their job?",
        "What's {p}'s occupation?",
        "Could you tell me {p}'s profession?",
    ),
    "residence": (
        "Do you know which city {p} lives in?",
        "Which city is {p} based in?",
        "Where is {p}'s home town?",
        "Could you tell me where {p} lives?",
    ),
    "arithmetic": (
        "Quick maths: {a} {op} {b}?",
        "What do you get from {a} {op} {b}?",
        "Work out {a} {sym} {b} for me.",
        "{a} {sym} {b} = ?",
        "Could you add up {a} {op} {b}?",
        "What's the result of {a} {op} {b}?",
    ),
    "colour": (
        "Do you know what colour {t} is?",
        "What's the colour of {t}?",
        "In one word, what colour is {t}?",
        "Which colour would you say {t} is?",
        "What color does {t} have?",
    ),
}

UNANSWERABLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "future": (
        "Can you predict who wins the {y} election in {c}?",
        "Who is going to be elected in {c} in {y}?",
        "Will it be sunny in {city} next {d}?",
        "What's the weather going to be like in {city} on {d}?",
        "What will bread cost in {c} in {y}?",
        "Which team will win the cup in {y}?",
    ),
    "private": (
        "Can you tell me my name?",
        "What did I have for dinner last night?",
        "What number am I thinking of?",
        "Where did I leave my keys?",
        "What is my favourite food?",
        "How old is my sister?",
        "What's my phone number?",
    ),
    "unknown_fact": (
        "Roughly how many people live in {c}?",
        "Who was the founder of {city}?",
        "How old is {p} exactly?",
        "Can I have {p}'s phone number?",
        "What is the tallest building in {city}?",
        "How many rivers does {c} have?",
    ),
}

GREETINGS: tuple[str, ...] = ("", "", "", "", "Hello! ", "Hi there, ", "Sorry to bother you, ")
SIGN_OFFS: tuple[str, ...] = ("", "", "", "", " Thanks.", " Thank you!")
SYSTEM_PROMPTS: tuple[str, ...] = ("You are a helpful assistant.", "Answer the user.")

_THINGS = (
    "the sky on a clear day",
    "fresh grass",
    "a ripe banana",
    "fresh snow",
    "a lump of coal",
    "a ripe strawberry",
    "a lemon",
    "a glass of milk",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_OPS = (("plus", "+"), ("minus", "-"), ("times", "*"))


class BuiltinPrompts:
    """Templated questions about ``world`` (default: the demo model's world), a share
    ``answerable_share`` of them answerable; a system prompt with probability
    ``system_share``."""

    def __init__(
        self,
        world: World | None = None,
        *,
        answerable_share: float = 0.5,
        system_share: float = 0.1,
    ) -> None:
        if not 0.0 <= answerable_share <= 1.0:
            raise ValueError(f"answerable_share must be in [0, 1]; got {answerable_share}")
        if not 0.0 <= system_share <= 1.0:
            raise ValueError(f"system_share must be in [0, 1]; got {system_share}")
        if world is None:
            from trainer.demo.corpus import make_world

            world = make_world()
        self.world = world
        self.answerable_share = answerable_share
        self.system_share = system_share
        self.countries = [c.name for c in world.countries]
        self.cities = world.all_cities()
        self.people = [p.name for p in world.people]
        self.things = list(_THINGS) + [f"the flag of {c}" for c in self.countries]

    def _slots(self, rng: random.Random) -> dict[str, str]:
        a, b = rng.randrange(13), rng.randrange(13)
        op, sym = rng.choice(_OPS)
        if op == "minus" and b > a:
            a, b = b, a
        thing = rng.choice(self.things)
        return {
            "c": rng.choice(self.countries),
            "city": rng.choice(self.cities),
            "p": rng.choice(self.people),
            "a": str(a),
            "b": str(b),
            "op": op,
            "sym": sym,
            "t": thing,
            "T": thing[0].upper() + thing[1:],
            "y": str(rng.randrange(2030, 2061)),
            "d": rng.choice(_WEEKDAYS),
        }

    def draw(self, rng: random.Random) -> SimPrompt:
        answerable = rng.random() < self.answerable_share
        table = ANSWERABLE_TEMPLATES if answerable else UNANSWERABLE_TEMPLATES
        kind = rng.choice(list(table))
        question = rng.choice(table[kind]).format(**self._slots(rng))
        greeting, sign_off = rng.choice(GREETINGS), rng.choice(SIGN_OFFS)
        if greeting and not greeting.endswith("! "):
            question = question[0].lower() + question[1:]
        messages: list[tuple[str, str]] = []
        if rng.random() < self.system_share:
            messages.append(("system", rng.choice(SYSTEM_PROMPTS)))
        messages.append(("user", greeting + question + sign_off))
        return SimPrompt(tuple(messages), answerable, kind)


# --- prompts from a file ----------------------------------------------------------------------


class FilePrompts:
    """Uniform draws from a fixed list (e.g. :func:`load_jsonl`'s)."""

    def __init__(self, prompts: Sequence[SimPrompt]) -> None:
        if not prompts:
            raise PromptFileError("no prompts to draw from")
        self.prompts = list(prompts)

    def draw(self, rng: random.Random) -> SimPrompt:
        return rng.choice(self.prompts)


def _parse_line(obj: Any, where: str) -> SimPrompt:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages == has_prompt:
        raise PromptFileError(f"{where}: give exactly one of 'messages' or 'prompt'")
    if has_prompt:
        text = obj["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        messages: tuple[tuple[str, str], ...] = (("user", text),)
    else:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list")
        parsed = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PromptFileError(
                    f"{where}: messages[{i}] must be an object with 'role' and 'content'"
                )
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise PromptFileError(
                    f"{where}: messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"
                )
            if not isinstance(content, str) or not content.strip():
                raise PromptFileError(f"{where}: messages[{i}].content must be a non-empty string")
            parsed.append((role, content))
        if parsed[-1][0] != "user":
            raise PromptFileError(
                f"{where}: the last message must be the user's (the question to answer), "
                f"not {parsed[-1][0]!r}"
            )
        messages = tuple(parsed)
    answerable = obj.get("answerable")
    if answerable is not None and not isinstance(answerable, bool):
        raise PromptFileError(f"{where}: 'answerable' must be true, false or absent")
    kind = obj.get("kind", "file")
    if not isinstance(kind, str) or not kind:
        raise PromptFileError(f"{where}: 'kind' must be a non-empty string")
    return SimPrompt(messages, answerable, kind)


def load_jsonl(path: str | Path) -> list[SimPrompt]:
    """Every prompt in a JSONL file (see the module docstring for the format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise PromptFileError(f"{path}: not UTF-8 text") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
        prompts.append(_parse_line(obj, where))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in the file")
    return prompts


def make_source(
    prompts_file: str | Path | None = None, *, answerable_share: float = 0.5
) -> PromptSource:
    """The prompts file's prompts if one is given, else the built-in templates."""
    if prompts_file is not None:
        return FilePrompts(load_jsonl(prompts_file))
    return BuiltinPrompts(answerable_share=answerable_share)
