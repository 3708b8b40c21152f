import math

import torch

from s3prl_ekd.core.loss import LossTerms, distill_loss, total_loss


def test_distill_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(1, 1, 2, 2)      # (B=1, L=1, T=2, D=2)
    target = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).reshape(1, 1, 2, 2)
    terms = distill_loss(pred, target, torch.tensor([[True, True]]))
    # L1: frame0 0, frame1 (2 + 2) / 2 = 2 -> mean over frames 1
    assert torch.allclose(terms.l1, torch.tensor([1.0]))
    # cos: frame0 cos=1, frame1 cos=0
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(0.5)) / 2
    assert torch.allclose(terms.cos, torch.tensor([expected]))


def test_distill_loss_ignores_padded_frames():
    pred = torch.zeros(1, 2, 3, 4)
    target = torch.zeros(1, 2, 3, 4)
    target[:, :, 2] = 100.0  # only the padded frame differs
    pred[..., 0] = 1.0
    target[:, :, :2, 0] = 1.0
    terms = distill_loss(pred, target, torch.tensor([[True, True, False]]))
    assert torch.allclose(terms.l1, torch.zeros(2))
    assert terms.l1.shape == (2,)


def test_total_loss_weights():
    terms = [LossTerms(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])),
             LossTerms(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))]
    # head set 0: 1 * (3 + 2 * 1) = 5 ; head set 1: 2 * (2 + 2 * 1) = 8
    assert float(total_loss(terms, [1.0, 2.0], l1_weight=1.0, cosine_weight=2.0)) == 13.0
