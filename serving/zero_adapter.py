"""A zero copy of a LoRA adapter: same rank, same target modules, every weight 0.

Served through vLLM it gives exactly the base model's answers (``x·A·B`` is 0 when ``A`` and
``B`` are) at exactly the adapter's cost: the same LoRA kernels run on the same shapes.
During a canary of an adapter against the adapter-less base, serving answers the stable arm
through the zero copy of the canary's adapter (``Settings.canary_like_for_like``), so the
two arms differ only in the weights and the canary's latency guardrail compares like with
like instead of charging the candidate for LoRA itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def write_zero_adapter(source: Path | str, target: Path | str) -> Path:
    """Write the zero copy of the PEFT adapter directory ``source`` to ``target`` (replaced
    if it exists) and return ``target``. Raises ``FileNotFoundError`` when ``source`` has
    no ``adapter_config.json`` or no safetensors weights."""
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    for name in (CONFIG, WEIGHTS):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name} does not exist")
    weights = {name: tensor.zero_() for name, tensor in load_file(source / WEIGHTS).items()}
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(source / CONFIG, partial / CONFIG)
    save_file(weights, partial / WEIGHTS, metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
