"""Tests of :mod:`trainer.ppo.models`."""

from __future__ import annotations

import pytest
import torch

from trainer.ppo.models import TokenBatch


def test_token_batch_layout_by_hand():
    # Row 0: prompt [5, 6, 7], response [8, 9]; row 1: prompt [5], response [4, 3, 2].
    batch = TokenBatch.build([[5, 6, 7], [5]], [[8, 9], [4, 3, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # The hidden state at index prompt_len - 1 + j predicts response token j.
    assert batch.positions.tolist() == [[2, 3, 4], [0, 1, 2]]
    assert batch.response_ids.tolist() == [[8, 9, 0], [4, 3, 2]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # The positions really point at the token before each response token.
    for row in range(2):
        for j in range(int(batch.mask[row].sum())):
            before = batch.input_ids[row, batch.positions[row, j] + 1]
            assert before == batch.response_ids[row, j]


def test_token_batch_select_and_errors():
    batch = TokenBatch.build([[1, 2], [3], [4]], [[5], [6, 7], []], pad_id=0)
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.input_ids.tolist() == [[4, 0, 0], [1, 2, 5]]
    assert sub.mask.tolist() == [[0], [1]]  # cut to the mini-batch's longest response
    assert sub.positions.tolist() == [[0], [1]]
    short = batch.select(torch.tensor([2]))  # and to its longest row
    assert short.input_ids.tolist() == [[4]] and short.positions.tolist() == [[0]]
    with pytest.raises(ValueError, match="at least one token"):
        TokenBatch.build([[]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        TokenBatch.build([[1], [2]], [[1]], pad_id=0)


def test_length_chunks_put_short_rows_together():
    batch = TokenBatch.build([[1, 2, 3], [1], [1, 2]], [[4, 4], [4], [4, 4, 4]], pad_id=0)
    # row lengths 5, 2, 5: the short row first, ties in row order
    assert [c.tolist() for c in batch.length_chunks(2)] == [[1, 0], [2]]
