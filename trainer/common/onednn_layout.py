"""Linear layers multiplying by a copy of their weight laid out once for oneDNN: the decode
loop's products on the CPU, in float32 or under bfloat16 autocast.

A float32 ``F.linear`` on the CPU hands the weight, row-major, to a general matrix product
(MKL's); a bfloat16 one hands it to oneDNN, which lays it out again for its kernels in every
call. A decode step multiplies one row per answer still being written (16 or fewer in a
rollout batch) by every weight of the model, and at so few rows that product reads the
weights well below the machine's memory bandwidth. oneDNN's kernels, given the weight
already in their blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what
inductor does to a frozen model's weights), run the same product faster. The layout is
made once per rollout batch, of the folded adapter's weights in place of the folded copy
the pass makes anyway (:func:`trainer.common.lora_folding.folded`: about 0.3 s for
SmolLM2's 538 MB) and of the LM head's (a copy of its own), and dropped after it.
Measured: docs/benchmarks.md, "The decode loop's products laid out for oneDNN" and "The
decode loop laid out under bfloat16 autocast".

* The results differ from ``F.linear``'s by rounding only (another kernel's summation
  order; the values of the weight are the same bits, see :func:`laid_out_copy`).
* Under bfloat16 autocast the copy is of the weight cast to bfloat16 and the input is cast
  as autocast casts a linear layer's: the product autocast runs, on a CPU that multiplies
  bfloat16 natively (elsewhere bfloat16 is emulated and autocast is not the default). On
  an AMX CPU the layout made no difference to the decode loop (docs/benchmarks.md, "Tried
  and not taken: the decode loop on weights laid out once for oneDNN"); on an AVX-512 BF16
  CPU without AMX it halved a SmolLM2 decode step's products in isolation and took a
  quarter off them in the decode loop.
* Not for the passes over whole sequences (scoring, the update): at hundreds of rows both
  kernels run near the CPU's peak.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch

from serving.engine import cpu_multiplies_bf16  # the decision serving's engine makes

MAX_ROWS = 32
"""The most rows per product for which the layout is made. It pays at a decode step's few
rows (16, 32); at 64 rows (a 31 M model's decode) it made no difference, and at 256 (the
demo model's) the decode ran slower and the training peak rose by 200 MB (not traced;
oneDNN keeps a kernel for each row count a batch passes through as answers finish).
Measured: docs/benchmarks.md, "The decode loop's products laid out for oneDNN"."""


def layout_pays(weight: torch.Tensor, autocast_dtype: torch.dtype | None, rows: int) -> bool:
    """Whether products of at most ``rows`` rows by ``weight`` in a pass under
    ``autocast_dtype`` take the laid-out path: a float32 weight on the CPU, with no
    autocast or under bfloat16 autocast on a CPU that multiplies bfloat16 natively, at most
    :data:`MAX_ROWS` rows, and a torch built with oneDNN's linear ops (private ops; without
    them the plain path stays)."""
    return (
        rows <= MAX_ROWS
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and (autocast_dtype is None or (autocast_dtype == torch.bfloat16 and cpu_multiplies_bf16()))
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def laid_out_copy(
    weight: torch.Tensor, rows: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A copy of ``weight`` ``[out, in]`` in ``dtype`` (None: its own; a pass's autocast
    dtype: the cast autocast makes) in oneDNN's layout for products of about ``rows`` rows
    (a hint for the kernel's choice; any row count multiplies correctly). An opaque oneDNN
    tensor: only :func:`multiplying_by` reads it. A reorder, no arithmetic: its dense form
    is ``weight`` (cast to ``dtype``) bit for bit."""
    source = weight.detach() if dtype is None else weight.detach().to(dtype)
    return torch.ops.mkldnn._reorder_linear_weight(source, batch_size=max(rows, 1))


def _laid_out_forward(
    x: torch.Tensor, *, laid_out: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != laid_out.dtype:  # autocast's cast of a linear layer's input
        rows = rows.to(laid_out.dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, laid_out, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def is_laid_out(linear: torch.nn.Module) -> bool:
    """Whether ``linear`` multiplies by a laid-out copy now (inside :func:`multiplying_by`)."""
    return "forward" in vars(linear)


@contextlib.contextmanager
def multiplying_by(layers: Sequence[tuple[torch.nn.Linear, torch.Tensor]]) -> Iterator[None]:
    """Run the body with each ``(linear, laid_out)`` layer's forward multiplying by
    ``laid_out`` (:func:`laid_out_copy`) instead of its ``weight``, which the body must not
    expect to be read (the caller's copy may be another weight: a folded adapter). No
    gradient flows through the laid-out path: refused where one could. Afterwards each
    layer's own forward is back and the copies are dropped with the caller's list."""
    if torch.is_grad_enabled():
        raise RuntimeError("multiplying_by() is for no-gradient passes: the layout is a copy")
    patched: list[torch.nn.Linear] = []
    try:
        for linear, laid_out in layers:
            if is_laid_out(linear):
                raise RuntimeError(f"{linear!r} already has its forward replaced")
            # An instance attribute: Module.__call__ (and its hooks) then call this forward.
            bias: torch.Tensor | None = linear.bias
            if bias is not None and bias.dtype != laid_out.dtype:
                bias = bias.detach().to(laid_out.dtype)  # as autocast casts it
            linear.forward = functools.partial(  # type: ignore[method-assign]
                _laid_out_forward, laid_out=laid_out, bias=bias
            )
            patched.append(linear)
        yield
    finally:
        for linear in patched:
            del linear.forward
