"""The vLLM engine, in-process, and the tokenizer that frames chat prompts for it.

One `AsyncLLM` serves every policy version: the base model, plus LoRA adapters that
later versions add at run time (``enable_lora``). The API process keeps its own copy
of the tokenizer so it can render the chat template, count prompt tokens and reject
over-long prompts before anything reaches the engine. Tokenising (chat template and
tokenizer, pure CPU) runs on a thread of its own (`Engine.chat_prompt_ids`,
`Engine.text_prompt_ids`), never on the event loop that streams every other answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from schemas.chat import ChatMessage
from schemas.settings import Settings

if TYPE_CHECKING:  # vLLM is imported when the engine starts, not with this module
    from vllm.config.lora import MaxLoRARanks
    from vllm.config.model import ModelDType
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


def on_gpu() -> bool:
    """The one device decision: CUDA when a GPU is visible, else the CPU build of vLLM."""
    import torch

    return torch.cuda.is_available()


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has native bfloat16 products (AVX-512 BF16 or AMX). Elsewhere
    bfloat16 is emulated: on an AVX2 CPU, 0.3 GFLOP/s against float32's 167 for one
    product, and vLLM decodes SmolLM2-135M 4.4x slower in bfloat16 than in float32
    (docs/benchmarks.md, "A CPU without bfloat16")."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolved_dtype(setting: str, gpu: bool) -> str:
    """The vLLM dtype the engine runs at for the setting ``engine_dtype``: as set, or for
    ``auto``: vLLM's own choice on a GPU (the model's), bfloat16 on a CPU that
    :func:`cpu_multiplies_bf16`, float32 on any other CPU."""
    if setting != "auto" or gpu:
        return setting
    return "bfloat16" if cpu_multiplies_bf16() else "float32"


def context_window(model_dir: Path | str, cap: int) -> int:
    """The context window to run ``model_dir`` with: its own (``max_position_embeddings``,
    or what the config calls it), at most ``cap`` (KV cache memory grows with it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter the engine can serve: a unique name, a numeric id, a directory."""

    name: str
    int_id: int
    path: Path | str


class Engine:
    """Start/stop the engine; render prompts; stream generations."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.max_model_len = context_window(model_dir, settings.max_model_len)
        self._llm: AsyncLLM | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # One thread: a Hugging Face fast tokenizer must not be used by two threads at once
        # ("Already borrowed"), and the work holds the GIL anyway. What it buys is an event
        # loop that keeps serving while a prompt is rendered.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="alignloop-tokenizer")

    def start(self) -> None:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        gpu = on_gpu()
        extra: dict[str, Any] = {}
        if gpu:  # its share of a GPU it may share (deploy/local/gpu_plan.py)
            extra["gpu_memory_utilization"] = self.settings.engine_gpu_memory_utilization
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.engine_kv_cache_gib))
        dtype = resolved_dtype(self.settings.engine_dtype, gpu)
        # Settings keeps both as plain str/int; vLLM validates them against its literals.
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            dtype=cast("ModelDType", dtype),
            max_model_len=self.max_model_len,
            enforce_eager=not gpu,
            enable_lora=True,
            max_lora_rank=cast("MaxLoRARanks", self.settings.max_lora_rank),
            max_loras=self.settings.max_loras,
            max_cpu_loras=max(self.settings.max_cpu_loras, self.settings.max_loras),
            disable_log_stats=True,
            # xgrammar: vLLM's default backend, and one that can forbid whitespace.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=self.settings.json_compact
            ),
            **extra,
        )
        log.info("starting vLLM engine on %s (%s)", self.model_dir, "cuda" if gpu else "cpu")
        self._llm = AsyncLLM.from_engine_args(args)

    @property
    def dead(self) -> bool:
        """The engine process died (vLLM's ``EngineDeadError`` on every request from now
        on): only a restart of this replica brings it back."""
        return self._llm is not None and bool(self._llm.errored)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def abort(self, request_id: str) -> None:
        """Stop generating ``request_id`` (nothing happens if it has ended). Fire and forget:
        safe to call from code being cancelled, where an ``await`` would be cancelled too."""
        llm = self._llm
        if llm is None:
            return

        async def abort() -> None:
            try:
                await llm.abort(request_id)
            except Exception:  # the engine is going away: nothing left to stop
                log.warning("could not abort %s", request_id, exc_info=True)

        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def add_adapter(self, adapter: Adapter) -> None:
        """Load an adapter before any request names it (a failure here leaves the engine
        running; a generation naming an unloadable adapter would not)."""
        from vllm.lora.request import LoRARequest

        assert self._llm is not None, "engine not started"
        await self._llm.add_lora(LoRARequest(adapter.name, adapter.int_id, str(adapter.path)))

    def prompt_token_ids(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Render the model's chat template (with ``tools``, when given) and tokenize, as
        the engine will see it. ``ValueError`` when the template cannot render the
        conversation (a role or tool format the model does not know)."""
        from jinja2 import TemplateError

        conversation = [_template_message(m) for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                tools=cast("list[dict[Any, Any] | Callable[..., Any]] | None", tools),
                add_generation_prompt=True,
                tokenize=False,
            )
        except TemplateError as e:
            raise ValueError(f"the model's chat template cannot render this: {e}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text_token_ids(self, prompt: str) -> list[int]:
        """A raw prompt (legacy completions) tokenized as the model's tokenizer does by
        default (with its BOS token, where it adds one)."""
        return list(self.tokenizer.encode(prompt))

    async def chat_prompt_ids(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """`prompt_token_ids` on the tokenizer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, self.prompt_token_ids, messages, tools)

    async def text_prompt_ids(self, prompt: str) -> list[int]:
        """`text_token_ids` on the tokenizer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, self.text_token_ids, prompt)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        adapter: Adapter | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield vLLM ``RequestOutput``s. Closing the iterator aborts the request."""
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        assert self._llm is not None, "engine not started"
        lora = None
        if adapter is not None:
            lora = LoRARequest(adapter.name, adapter.int_id, str(adapter.path))
        async for output in self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids),
            sampling_params,
            request_id,
            lora_request=lora,
        ):
            yield output


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """One message as Hugging Face chat templates take it: tool call arguments as a
    mapping (templates serialise them; a string that is not JSON stays a string)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _json_or_text(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
