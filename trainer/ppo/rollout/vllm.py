"""Rollouts sampled by an in-process vLLM engine on the same base model, with
``enable_lora``.

**Weight sync** = write the actor's LoRA adapter (a few MB) to a fresh directory and load it
into the engine under a new adapter id; the engine never restarts and the base is not
copied. The sync has a timeout and raises :class:`~trainer.ppo.rollout.base.AdapterSyncError`
with what went wrong. On a CPU-only machine the engine's processes and the trainer split
the cores (:mod:`trainer.ppo.rollout.placement`).
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.engine import context_window
from trainer.ppo.config import VllmDtype
from trainer.ppo.models import PolicyModels
from trainer.ppo.rollout.base import AdapterSyncError, Finished, Sampler, Which
from trainer.ppo.rollout.placement import CorePlacement, pin_process, split_cpus

log = logging.getLogger(__name__)

CONTEXT_CAP = 4096
"""Largest context window a rollout engine gets by default: prompts are capped well below
(``RoundConfig.max_prompt_tokens``), and the KV cache must hold one such sequence."""


@dataclass(frozen=True)
class VllmOptions:
    """How the rollout engine is started (see :class:`trainer.rounds.config.RoundConfig`)."""

    dtype: VllmDtype = "auto"
    max_model_len: int | None = None
    """The engine's context window; None: the model's own (its config's
    ``max_position_embeddings``), at most :data:`CONTEXT_CAP`."""
    max_lora_rank: int = 8
    kv_cache_mib: int = 256
    """CPU only: the engine's KV cache. A rollout needs ``rows x (prompt + answer)``
    tokens of it (the demo model: 1 KiB per token, so 256 rows of 512 tokens = 128 MiB);
    vLLM's CPU default is GiBs, allocated up front."""
    engine_cpus: int = 0
    """CPU only: cores given to the engine's processes; the trainer keeps the rest while
    the engine generates (it scores finished answers meanwhile, each on its own cores
    instead of both fighting over all of them) and takes every core while the engine is
    idle. 0 = half the cores (at least one) when there are two or more, else no pinning."""
    warmup_rows: int = 256
    """Rows of the start-up warm-up batch (see :meth:`VllmSampler._warm_up`)."""
    gpu_memory_utilization: float = 0.3
    """GPU only: the engine's share of the GPU's memory (``RoundConfig``'s
    ``vllm_gpu_memory_utilization``)."""
    sync_timeout_s: float = 60.0


def write_zero_adapter(base_model: Path, directory: Path, rank: int) -> None:
    """A PEFT LoRA adapter of ``rank`` on every module the trainer's LoRA wraps on
    ``base_model`` (:func:`~trainer.reward.model.lora_target_modules`: the body's linear
    layers, whatever the architecture names them), all zeros (the base's own outputs):
    warm-up traffic for the LoRA path. The shapes come from the model built on the meta
    device from its config: no weights are read."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.reward.model import lora_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    targets = set(lora_target_modules(model))
    body = model.base_model_prefix
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            leaf not in targets
            or not name.startswith(body + ".")
            or not isinstance(module, torch.nn.Linear)
        ):
            continue
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, module.in_features)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    if not tensors:
        raise ValueError(f"no linear layers for LoRA in {base_model}")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(base_model),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def _finished(index: int, out: Any) -> Finished:
    """A finished vLLM ``RequestOutput`` as row ``index``'s answer."""
    completion = out.outputs[0]
    tokens = [int(t) for t in completion.token_ids]
    steps = completion.logprobs or []
    return Finished(
        index, tokens, [float(step[t].logprob) for step, t in zip(steps, tokens, strict=False)]
    )


class VllmSampler(Sampler):
    """An in-process vLLM ``LLM`` with LoRA; the actor is synced as a new adapter."""

    def __init__(self, base_model: Path, sync_dir: Path, options: VllmOptions) -> None:
        from vllm import LLM

        self.options = options
        self.base_model = Path(base_model)
        self.sync_dir = Path(sync_dir)
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        self.sync_dir.mkdir(parents=True)
        gpu = torch.cuda.is_available()
        dtype: VllmDtype = options.dtype
        if dtype == "auto" and not gpu:
            dtype = "bfloat16"
        extra: dict[str, Any] = {}
        if gpu:
            # A share of the whole GPU, which vLLM checks is free at start-up: hand back
            # what this process's allocator caches but does not use (deploy/local/gpu_plan).
            extra["gpu_memory_utilization"] = options.gpu_memory_utilization
            torch.cuda.empty_cache()
        else:
            extra["kv_cache_memory_bytes"] = options.kv_cache_mib * 2**20
        split = None if gpu else split_cpus(options.engine_cpus)
        self.placement = None if split is None else CorePlacement(*split)
        if self.placement is not None:
            # The engine's processes inherit the cores this process has while they start.
            pin_process(self.placement.engine)
        try:
            self.llm = LLM(
                model=str(base_model),
                dtype=dtype,
                max_model_len=options.max_model_len or context_window(base_model, CONTEXT_CAP),
                enforce_eager=not gpu,
                enable_lora=True,
                max_lora_rank=options.max_lora_rank,
                max_loras=2,
                max_cpu_loras=4,
                logprobs_mode="processed_logprobs",  # after temperature: what was sampled from
                disable_log_stats=True,
                seed=0,
                **extra,
            )
        finally:
            if self.placement is not None:
                self.placement.widen()
                log.info(
                    "rollout engine on cores %s; trainer on cores %s while it generates,"
                    " on every core (%d torch threads) while it is idle",
                    sorted(self.placement.engine),
                    sorted(self.placement.trainer),
                    self.placement.threads,
                )
        self._next_id = 1
        self._current: Any = None
        self._others: dict[str, Any] = {}
        self._broken: str | None = None
        self._batches = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """A few steps of a full-size batch (``warmup_rows`` short prompts), so the engine's
        first-call costs (allocation, kernels for large prefill and decode batches: seconds
        on CPU) are paid at start-up, not by the first rollout."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = max(1, self.options.warmup_rows)
        # Distinct prompts (identical ones would be prefix-cached: no real prefill), seeded
        # and with log-probs, like rollouts.
        params = [
            SamplingParams(max_tokens=4, detokenize=False, ignore_eos=True, seed=r, logprobs=0)
            for r in range(rows)
        ]
        prompts = [
            TokensPrompt(prompt_token_ids=[(r * 16 + i) % 1000 + 10 for i in range(16)])
            for r in range(rows)
        ]
        self.llm.generate(prompts, params, use_tqdm=False)
        # The LoRA path has first-use costs of its own: run the batch again through a zero
        # adapter on every projection (the actor's adapter later takes the same path).
        zero = self.sync_dir / "warmup-zero-adapter"
        write_zero_adapter(self.base_model, zero, self.options.max_lora_rank)
        request = self._new_request("warmup", zero)
        self.llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        self.llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(zero, ignore_errors=True)

    @property
    def broken(self) -> str | None:
        """Why the engine cannot be used any more (a failed sync), or None."""
        return self._broken

    def _new_request(self, name: str, path: Path):
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, self._next_id, str(path))
        self._next_id += 1
        return request

    def sync(self, models: PolicyModels, tag: str) -> float:
        """Write the actor's adapter and load it into the engine, within the timeout.

        The work runs in a daemon thread: a sync that never returns (a dead or wedged
        engine) leaves the caller with :class:`AdapterSyncError`, not a hang, and cannot
        keep the process from exiting. After a failed sync the sampler refuses to go on."""
        if self._broken:
            raise AdapterSyncError(f"the rollout engine is unusable after: {self._broken}")
        started = time.perf_counter()
        target = self.sync_dir / f"policy-{tag}"
        request = self._new_request(f"policy-{tag}", target)
        failure: list[BaseException] = []

        def write_and_load() -> None:
            try:
                shutil.rmtree(target, ignore_errors=True)
                models.save_policy(target)
                if not self.llm.llm_engine.add_lora(request):
                    raise RuntimeError("vLLM refused it")
            except BaseException as exc:  # handed to the waiting caller
                failure.append(exc)

        worker = threading.Thread(target=write_and_load, name="lora-sync", daemon=True)
        worker.start()
        worker.join(self.options.sync_timeout_s)
        if worker.is_alive():
            self._broken = (
                f"syncing the policy adapter into vLLM took over {self.options.sync_timeout_s} s "
                f"({target}); the rollout engine is stuck or overloaded"
            )
            raise AdapterSyncError(self._broken)
        if failure:
            self._broken = f"syncing the policy adapter {target} failed: {failure[0]}"
            raise AdapterSyncError(self._broken) from failure[0]
        previous, self._current = self._current, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return time.perf_counter() - started

    # Long on purpose: submitting, the output thread and the idle hand-off share one
    # lifetime (the engine's requests); apart, each piece would have to be kept in step.
    def stream(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        which: Which = "current",
    ) -> Iterator[list[Finished]]:
        """Queue every prompt in the engine, then yield responses as the engine finishes
        them. The engine keeps generating in its own process while the caller works on
        what it was given; a thread here takes its outputs as fast as it makes them, so the
        moment it is idle is known (the trainer then takes every core) even while the caller
        is busy. Row ``i`` is sampled with seed ``seed * 1_000_003 + i``. A caller that stops
        early aborts the rest of the requests."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        lora = self._lora_for(which)
        engine = self.llm.llm_engine
        self._batches += 1
        ids = {f"rollout-{self._batches}-{i}": i for i in range(len(prompt_ids))}
        for request_id, i in ids.items():
            params = SamplingParams(
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=max_new_tokens,
                seed=seed * 1_000_003 + i,
                logprobs=0,
                detokenize=False,  # the trainer decodes what it needs itself
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids[i]))
            engine.add_request(request_id, prompt, params, lora_request=lora)

        answers: queue.SimpleQueue[Finished | BaseException | None] = queue.SimpleQueue()
        idle, stop = threading.Event(), threading.Event()

        def drive() -> None:
            """Step the engine until every request has finished (or the caller left, then
            abort the rest); each finished answer goes to the caller at once."""
            pending = set(ids)
            try:
                while pending and not stop.is_set():
                    for out in engine.step():
                        if out.finished and out.request_id in pending:
                            pending.discard(out.request_id)
                            answers.put(_finished(ids[out.request_id], out))
                if pending:
                    engine.abort_request(sorted(pending))
            except BaseException as exc:  # handed to the caller
                answers.put(exc)
            finally:
                idle.set()
                answers.put(None)

        if self.placement is not None:
            self.placement.narrow()
        driver = threading.Thread(target=drive, name="rollout-engine", daemon=True)
        driver.start()
        wide = False
        try:
            ended = False
            while not ended:
                ready = [answers.get()]  # wait for one, then take whatever else is there
                while not answers.empty():
                    ready.append(answers.get())
                for answer in ready:
                    if isinstance(answer, BaseException):
                        raise answer
                ended = ready[-1] is None
                if idle.is_set() and not wide and self.placement is not None:
                    self.placement.widen()  # the engine is done: the trainer takes every core
                    wide = True
                finished = [a for a in ready if isinstance(a, Finished)]
                if finished:
                    yield finished
        finally:
            stop.set()
            driver.join(self.options.sync_timeout_s)
            if self.placement is not None:
                self.placement.widen()

    def _lora_for(self, which: Which) -> Any:
        if which == "current":
            if self._current is None:
                raise AdapterSyncError("no policy adapter synced into vLLM yet")
            return self._current
        if which == "base":
            return None
        key = str(Path(which).resolve())
        if key not in self._others:
            self._others[key] = self._new_request(f"eval-{len(self._others)}", Path(key))
        return self._others[key]

    def close(self) -> None:
        """Stop the engine process and give this process every core back."""
        self.llm.llm_engine.engine_core.shutdown()  # stops the EngineCore process now
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self.placement is not None:
            self.placement.widen()
