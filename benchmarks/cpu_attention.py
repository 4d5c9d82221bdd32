"""transformers' ``sdpa`` attention against alignloop's CPU attention
(:mod:`trainer.common.cpu_attention`), call for call, on the shapes a PPO round makes.

Both sides get the same query, key and value tensors, the same boolean mask (left-padded
rows, as the decode loop pads prompts) and the same scale, under the same autocast; the
order alternates (A B B A ...) and each side's time is the median over rounds. Shapes (a
Llama of ``--heads`` query heads over ``--kv-heads`` KV heads of 64 dimensions):

* ``decode``: one token for each of ``--rows`` rows against a cache of ``--length``;
* ``prefill``: a scoring pass, ``--micro-rows`` rows of ``--length`` tokens, no gradient;
* ``train``: the same with forward and backward (a training micro-batch).

``--precision bfloat16`` runs both under CPU bfloat16 autocast with bfloat16 inputs (the
decode loop's and the update's case); ``float32`` without autocast. Outputs are compared
(float32: equal up to rounding; bfloat16: each side's error against the float32 attention
of the same inputs).

    ./dev bench cpu_attention [--precision bfloat16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trainer.common.cpu_attention import cpu_sdpa_attention

SIDES: dict[str, Callable[..., tuple[torch.Tensor, Any]]] = {
    "transformers_sdpa": sdpa_attention_forward,
    "alignloop": cpu_sdpa_attention,
}


def _inputs(
    rows: int, q_len: int, kv_len: int, heads: int, kv_heads: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = ((rows, heads, q_len, 64), (rows, kv_heads, kv_len, 64), (rows, kv_heads, kv_len, 64))
    qkv = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    causal = torch.ones(kv_len, kv_len, dtype=torch.bool).tril()[kv_len - q_len :]
    mask = causal.expand(rows, 1, q_len, kv_len).clone()
    for r in range(rows):  # left padding: row r's first r % 8 positions are padding
        pad = r % 8
        mask[r, :, :, :pad] = False
        mask[r, :, : max(0, pad - (kv_len - q_len)), :] = True
    return qkv, mask


def _time_call(
    fn: Callable[..., Any], layer: Any, qkv: list[torch.Tensor], mask: torch.Tensor,
    grad: bool, autocast: bool, repeats: int,
) -> tuple[float, torch.Tensor]:  # fmt: skip
    """Median seconds of ``repeats`` calls (after 2 warm-ups), and the last output."""
    times, out = [], None
    for k in range(repeats + 2):
        inputs = [t.detach().requires_grad_(grad) for t in qkv]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(layer, *inputs, mask, scaling=0.125)
        if grad:
            out.float().sum().backward()
        if k >= 2:
            times.append(time.perf_counter() - started)
    assert out is not None
    return statistics.median(times), out.detach().float()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--rows", type=int, default=64, help="decode rows (a rollout batch)")
    ap.add_argument("--micro-rows", type=int, default=16, help="rows of a scoring/training pass")
    ap.add_argument("--length", type=int, default=61, help="tokens (prompt + answer)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20, help="calls per side per round")
    args = ap.parse_args()
    autocast = args.precision == "bfloat16"
    dtype = torch.bfloat16 if autocast else torch.float32
    layer = types.SimpleNamespace(
        num_key_value_groups=args.heads // args.kv_heads, is_causal=True, layer_idx=0
    )
    cases = {
        "decode": (args.rows, 1, args.length, False),
        "prefill": (args.micro_rows, args.length, args.length, False),
        "train": (args.micro_rows, args.length, args.length, True),
    }
    results: dict[str, Any] = {}
    for case, (rows, q_len, kv_len, grad) in cases.items():
        qkv, mask = _inputs(rows, q_len, kv_len, args.heads, args.kv_heads, dtype)
        exact, _ = sdpa_attention_forward(layer, *[t.float() for t in qkv], mask, scaling=0.125)
        per_round: dict[str, list[float]] = {side: [] for side in SIDES}
        error: dict[str, float] = {}
        for r in range(args.rounds):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for side in order:
                seconds, out = _time_call(
                    SIDES[side], layer, qkv, mask, grad, autocast, args.repeats
                )
                per_round[side].append(seconds * 1e3)
                error[side] = float((out - exact).abs().max())
        median = {side: statistics.median(ms) for side, ms in per_round.items()}
        results[case] = {
            "shape": {"rows": rows, "query_tokens": q_len, "key_tokens": kv_len},
            "backward": grad,
            "ms_median": {s: round(v, 3) for s, v in median.items()},
            "ms_per_round": {s: [round(v, 3) for v in ms] for s, ms in per_round.items()},
            "speedup": round(median["transformers_sdpa"] / median["alignloop"], 2),
            "max_abs_error_vs_float32": {s: float(f"{e:.3g}") for s, e in error.items()},
        }
    print(
        json.dumps(
            {
                "config": {**vars(args), "torch": torch.__version__},
                "machine": {"cpu": platform.processor() or platform.machine()},
                "cases": results,
                "differences_not_removed": [
                    "alignloop returns float32 under bfloat16 autocast (sdpa: bfloat16); the "
                    "next layer's autocast casts it, in both models, to bfloat16"
                ],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
