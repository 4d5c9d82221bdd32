"""Build the demo base model offline: BPE tokenizer, chat template, a small Llama, pretraining.

No model can be downloaded here, so ``alignloop up`` (and the tests) make their own: a
Llama-architecture causal LM of about two million parameters, trained for minutes on 2
CPU cores (docs/benchmarks.md, "The demo base model") on the synthetic corpus of
:mod:`trainer.demo.corpus`. The result is an ordinary
Hugging Face directory (safetensors, ``tokenizer.json`` with its chat template,
``generation_config.json``) that ``transformers`` and vLLM load like any other model, plus
``alignloop_model.json``, the manifest that says which recipe built it.

The build is deterministic (same config, same bytes in ``model.safetensors``) and atomic:
it happens in a hidden sibling directory that is renamed into place only once the manifest
is written, so a killed build never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from schemas.config import ConfigBase
from trainer.common.progress import progress_bar
from trainer.demo import corpus

RECIPE_VERSION = "1"
"""Bumped whenever this module's training recipe changes the weights (part of the hash)."""

MANIFEST_NAME = "alignloop_model.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MANIFEST_NAME,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
"""Ids 0..6, in this order. ``<|end|>`` closes every turn and is what generation stops on."""

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>' }}"
    "You may call these functions. To call one, write "
    '<tool_call>{"name": <name>, "arguments": <object>}</tool_call>.'
    "<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    "{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{{ '<|system|>' }}"
    "{% elif message['role'] in ['user', 'tool'] %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '<tool_response>' }}{% endif %}"
    "{% if message['content'] is none %}"
    "{% elif message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '</tool_response>' }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>{\"name\": ' }}{{ call.function.name | tojson }}{{ ', \"arguments\": ' }}"
    "{% if call.function.arguments is string %}{{ call.function.arguments }}"
    "{% else %}{{ call.function.arguments | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""``<|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>``.

Developer messages render as system turns (OpenAI's newer name for the same thing); content
may be a string or a list of text parts. No whitespace is added around the role tokens, so
the template's token ids equal the concatenation the training loop builds by hand.

Tools use the Hermes format (vLLM's ``hermes`` tool-call parser reads it): the offered
functions as JSON in a system turn, each call an assistant writes as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, and each tool result as a user
turn wrapped in ``<tool_response>``. The corpus has no tool turns, so the demo model rarely
calls a tool by itself; forced calls (``tool_choice`` required or named) always work.
"""


@dataclass(frozen=True)
class BootstrapConfig(ConfigBase):
    """Everything that determines the demo model; its hash names the build (``recipe_hash``).

    How long the defaults take to build on 2 CPU cores: docs/benchmarks.md, "The demo base
    model".
    """

    seed: int = field(
        default=0,
        metadata={
            "help": "Seeds the corpus sampling, weight init, batch order and the mixture "
            "measurement."
        },
    )
    world_seed: int = field(
        default=corpus.DEFAULT_WORLD_SEED,
        metadata={
            "help": "The synthetic world; evaluation prompts (``corpus.sample_prompts``) assume "
            "the default."
        },
    )
    corpus_size: int = field(
        default=20_000,
        metadata={"help": "Training conversations generated (the loop samples batches from them)."},
    )
    verbose_rate: float = field(
        default=0.5,
        metadata={"help": "Share of padded answers among answerable questions in the corpus."},
    )
    fabricate_rate: float = field(
        default=0.5,
        metadata={
            "help": "Share of confident fabrications among unanswerable questions in the corpus."
        },
    )
    vocab_size: int = field(
        default=2048,
        metadata={"help": "BPE vocabulary, special tokens and the 256 byte symbols included."},
    )
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = field(
        default=6,
        metadata={
            "help": "Head dim is ``hidden_size // num_heads``; keep it 32 or 64 (vLLM CPU kernels)."
        },
    )
    num_kv_heads: int = field(
        default=2,
        metadata={
            "help": "Grouped-query attention: fewer KV heads make the KV cache and the model "
            "smaller."
        },
    )
    intermediate_size: int = 512
    max_position_embeddings: int = field(
        default=512,
        metadata={"help": "The context window (serving and rollouts use the model's own)."},
    )
    steps: int = field(
        default=600,
        metadata={"help": "Optimizer steps."},
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Conversations per step."},
    )
    lr: float = field(
        default=3e-3,
        metadata={"help": "Peak AdamW learning rate (small models like it high)."},
    )
    warmup_steps: int = field(
        default=30,
        metadata={"help": "Linear warm-up before the cosine decay to ``lr / 10``."},
    )
    weight_decay: float = 0.01
    num_threads: int = field(
        default=2,
        metadata={
            "help": "Torch intra-op threads during the build: a fixed count keeps float sums in "
            "a fixed order, which byte-identical weights need."
        },
    )
    mixture_prompts: int = field(
        default=200,
        metadata={
            "help": "Fresh prompts sampled at temperature 1 to measure the behaviour mixture "
            "(0: skip)."
        },
    )


def recipe_hash(config: BootstrapConfig) -> str:
    """A short stable hash of the config and the generator/recipe versions.

    Two builds with the same hash produce the same weights, so a directory whose manifest
    carries the hash need not be rebuilt.
    """
    payload = {
        "config": asdict(config),
        "corpus_generator": corpus.GENERATOR_VERSION,
        "recipe": RECIPE_VERSION,
        "chat_template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:16],
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(model_dir: Path) -> dict | None:
    """The manifest of a model directory, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_complete(model_dir: Path, expected_hash: str | None = None) -> bool:
    """Whether ``model_dir`` holds a finished build (of ``expected_hash``, if given).

    The manifest is written last, so its presence plus every required file means the build
    finished; a directory without it is a killed or foreign build.
    """
    model_dir = Path(model_dir)
    if not all((model_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    manifest = read_manifest(model_dir)
    if manifest is None:
        return False
    return expected_hash is None or manifest.get("recipe_hash") == expected_hash


# --- tokenizer ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, nothing is ever unknown) with the chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=bpe_trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=END,  # end of turn: what a chat completion stops on
        pad_token=PAD,
        additional_special_tokens=[EOS, SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def encode_example(
    tokenizer: PreTrainedTokenizerFast, example: corpus.Example
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant turn (with ``<|end|>``)
    is learned, everything else is context (label -100).

    Built piecewise rather than via ``apply_chat_template`` so the label mask is exact;
    a unit test checks the ids equal the template's.
    """
    special = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    ids = [special[BOS]]
    if example.system:
        ids += [special[SYSTEM], *text(example.system), special[END]]
    ids += [special[USER], *text(example.prompt), special[END], special[ASSISTANT]]
    answer = [*text(example.answer), special[END]]
    labels = [-100] * len(ids) + answer
    return ids + answer, labels


# --- training ----------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed threads + deterministic kernels + a private RNG for the build, restoring the
    caller's state afterwards (the build seeds torch; the caller's random stream is theirs).
    """
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)


def _lr_lambda(config: BootstrapConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))
        return 0.1 + 0.9 * cosine

    return factor


def build_model_config(config: BootstrapConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[END],
        pad_token_id=ids[PAD],
        dtype="float32",
    )


def _pad_batch(
    rows: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: real tokens never attend to later pads, so no attention mask is needed."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def pretrain(
    model: LlamaForCausalLM,
    encoded: list[tuple[list[int], list[int]]],
    config: BootstrapConfig,
    pad_id: int,
    *,
    progress: bool = True,
) -> list[float]:
    """AdamW + warm-up/cosine on random batches of the corpus; returns the loss per step."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    model.train()
    losses: list[float] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("pretraining demo model", total=config.steps, status="")
        for _step in range(config.steps):
            index = torch.randint(len(encoded), (config.batch_size,), generator=generator)
            input_ids, labels = _pad_batch([encoded[i] for i in index.tolist()], pad_id)
            loss = model(input_ids=input_ids, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(task, advance=1, status=f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _build_into(directory: Path, config: BootstrapConfig, *, progress: bool) -> dict:
    """Train and save everything except the manifest into ``directory``; return its data."""
    started = time.monotonic()
    torch.manual_seed(config.seed)  # weight init; batch order has its own generator
    world = corpus.make_world(config.world_seed)
    examples = corpus.make_corpus(
        config.seed,
        config.corpus_size,
        world=world,
        verbose_rate=config.verbose_rate,
        fabricate_rate=config.fabricate_rate,
    )
    texts = [t for e in examples for t in ((e.system or ""), e.prompt, e.answer) if t]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    encoded = [encode_example(tokenizer, e) for e in examples]
    too_long = max(len(ids) for ids, _ in encoded)
    if too_long > config.max_position_embeddings:
        raise ValueError(f"a corpus example has {too_long} tokens, beyond the context window")

    model = LlamaForCausalLM(build_model_config(config, tokenizer))
    losses = pretrain(model, encoded, config, tokenizer.pad_token_id, progress=progress)
    train_seconds = time.monotonic() - started

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tail = losses[-min(20, len(losses)) :]
    return {
        "parameters": model.num_parameters(),
        "train_seconds": round(train_seconds, 1),  # corpus + tokenizer + pretraining
        "final_loss": round(sum(tail) / len(tail), 4),
        "corpus_examples": len(examples),
        "max_example_tokens": too_long,
    }


def _weights_sha256(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete hidden build/trash siblings left by processes that no longer exist."""
    for sibling in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        try:
            pid = int(sibling.name.split("-")[-2])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; a model is meant to be shared (e.g. with a
    serving container running as another user), so open it up like a normal checkout."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def finish_build(
    build_dir: Path, out_dir: Path, expected_hash: str, manifest: dict, *, force: bool
) -> None:
    """Complete a build directory and move it into place: the manifest is written last
    (its presence is what marks the directory complete), then the files are made readable
    and the directory installed at ``out_dir`` (:func:`_install`)."""
    (build_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    _make_readable(build_dir)
    _install(build_dir, out_dir, expected_hash, force=force)


def _install(build_dir: Path, out_dir: Path, expected_hash: str, *, force: bool) -> None:
    """Rename the finished build into place, replacing an older model if there is one.

    Renames are atomic, so a reader sees the old model, no model, or the new one, never a
    mixture. If a concurrent build of the same recipe got there first, keep theirs.
    """
    if out_dir.exists():
        if not force and is_complete(out_dir, expected_hash):
            shutil.rmtree(build_dir)
            return
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(out_dir, trash)
        try:
            os.rename(build_dir, out_dir)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(build_dir, out_dir)
    except OSError:
        # Someone installed a model between our check and our rename.
        if is_complete(out_dir, expected_hash):
            shutil.rmtree(build_dir)
            return
        raise


def bootstrap_demo_model(
    out_dir: Path,
    config: BootstrapConfig = BootstrapConfig(),
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build the demo model into ``out_dir`` (unless it already holds this recipe's build).

    Returns ``out_dir``. With ``force`` it rebuilds even if the recipe hash matches. The
    build happens in a hidden sibling directory and is renamed into place when complete.
    """
    from trainer.demo.mixture import measure_mixture  # mixture imports this module's constants

    out_dir = Path(out_dir)
    expected = recipe_hash(config)
    if not force and is_complete(out_dir, expected):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out_dir)
    build_dir = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.build-{os.getpid()}-", dir=out_dir.parent)
    )
    try:
        with _deterministic_torch(config.num_threads):
            stats = _build_into(build_dir, config, progress=progress)
            rates = None
            if config.mixture_prompts > 0:
                rates = measure_mixture(
                    build_dir, n_prompts=config.mixture_prompts, seed=config.seed
                ).to_dict()
        manifest = {
            "recipe_hash": expected,
            "recipe_version": RECIPE_VERSION,
            "corpus_generator_version": corpus.GENERATOR_VERSION,
            "config": asdict(config),
            **stats,
            "weights_sha256": _weights_sha256(build_dir),
            "mixture": rates,
        }
        finish_build(build_dir, out_dir, expected, manifest, force=force)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return out_dir
