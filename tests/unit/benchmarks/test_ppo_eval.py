"""The held-out yardstick's pieces on hand-sized tensors: where an answer ends, the
positions of a left-padded batch, and the classifier read at each row's last token."""

from __future__ import annotations

import torch

from benchmarks.ppo_eval import _mean_and_stderr, _positions, cut_after_eos, reward_scores


def test_an_answer_ends_at_its_first_end_of_sequence_token_which_it_keeps():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    assert cut_after_eos(responses, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],  # never ended: every token counts
    ]


def test_left_padded_rows_start_at_position_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert _positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_the_reward_is_read_at_each_rows_last_attended_token():
    class Backbone(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids):
            # hidden state = the token id itself, so the score shows which token was read
            return type("Out", (), {"last_hidden_state": input_ids[..., None].float()})

    class Classifier(torch.nn.Module):
        base_model_prefix = "model"

        def __init__(self) -> None:
            super().__init__()
            self.model = Backbone()
            self.score = torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.ones_(self.score.weight)

    ids = torch.tensor([[0, 4, 5, 6, 0], [7, 8, 9, 3, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert reward_scores(Classifier(), ids, mask).tolist() == [6.0, 1.0]


def test_mean_and_standard_error():
    mean, err = _mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # sample std of 1..4 = sqrt(5/3); / sqrt(4)
    assert mean == 2.5 and abs(err - (5 / 3) ** 0.5 / 2) < 1e-6
