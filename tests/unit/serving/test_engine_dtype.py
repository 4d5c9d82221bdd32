"""The dtype serving's vLLM engine runs at (serving/engine.py): a setting other than
``auto`` as it is; ``auto`` left to vLLM on a GPU, bfloat16 only on a CPU that multiplies
it natively, float32 on any other CPU."""

from __future__ import annotations

import pytest

from serving import engine


@pytest.mark.parametrize(
    ("setting", "gpu", "native", "expected"),
    [
        ("auto", False, True, "bfloat16"),
        ("auto", False, False, "float32"),  # emulated bfloat16: 4.4x slower decoding
        ("auto", True, False, "auto"),  # vLLM's own choice: the model's dtype
        ("bfloat16", False, False, "bfloat16"),  # asked for: given
        ("float16", True, True, "float16"),
    ],
)
def test_auto_is_bfloat16_only_where_the_cpu_multiplies_it(
    monkeypatch: pytest.MonkeyPatch, setting: str, gpu: bool, native: bool, expected: str
):
    monkeypatch.setattr(engine, "cpu_multiplies_bf16", lambda: native)  # the CPU's features
    assert engine.resolved_dtype(setting, gpu) == expected
