"""The engine's log-probabilities in OpenAI's chat and legacy shapes, on a hand-made case."""

import math

from vllm.logprobs import Logprob

from serving.logprobs import chat_logprobs, completion_logprobs

# Two generated tokens: "Hi" (id 7, the likeliest) then "!" (id 3, ranked second).
POSITIONS = [
    {7: Logprob(-0.1, rank=1, decoded_token="Hi"), 9: Logprob(-2.5, rank=2, decoded_token="Yo")},
    {
        2: Logprob(-0.7, rank=1, decoded_token="."),
        3: Logprob(-0.9, rank=2, decoded_token="!"),
        5: Logprob(-math.inf, rank=3, decoded_token="é"),
    },
]


def test_chat_shape_keeps_the_chosen_token_and_the_top_k_in_rank_order():
    [hi, bang] = chat_logprobs([7, 3], POSITIONS, top_k=3)
    assert (hi.token, hi.logprob, hi.bytes) == ("Hi", -0.1, [72, 105])
    assert [t.token for t in hi.top_logprobs] == ["Hi", "Yo"]
    assert (bang.token, bang.logprob) == ("!", -0.9)
    assert [(t.token, t.logprob) for t in bang.top_logprobs] == [
        (".", -0.7), ("!", -0.9), ("é", -9999.0),  # -inf is not JSON: clamped as vLLM does
    ]  # fmt: skip
    assert bang.top_logprobs[2].bytes == [0xC3, 0xA9]
    assert chat_logprobs([7, 3], POSITIONS, top_k=0)[1].top_logprobs == []


def test_legacy_shape_is_parallel_lists_with_offsets_after_the_echo():
    lp = completion_logprobs([7, 3], POSITIONS, top_k=1, offset=5)
    assert lp.tokens == ["Hi", "!"]
    assert lp.token_logprobs == [-0.1, -0.9]
    assert lp.top_logprobs == [{"Hi": -0.1}, {".": -0.7}]
    assert lp.text_offset == [5, 7]
