"""Aux losses against values worked out by hand."""

import math

import pytest
import torch

from upcycle.layers import hoyer_sparsity, l1_sparsity, load_balancing_loss, router_z_loss


def test_load_balancing_uniform_is_one():
    probs = torch.full((8, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, indices, 4).item() == pytest.approx(1.0)


def test_load_balancing_hand_case():
    # 2 experts, 2 tokens, top-1. Token 0 -> expert 0 (p=0.9), token 1 -> expert 0 (p=0.6).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    indices = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.75, 0.25] -> 2 * (1 * 0.75) = 1.5
    assert load_balancing_loss(probs, indices, 2).item() == pytest.approx(1.5)


def test_load_balancing_gradient_flows_to_probs_only():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = logits.softmax(-1)
    load_balancing_loss(probs, probs.topk(1).indices, 3).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_z_loss_hand_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_hoyer_hand_cases():
    one_hot = torch.tensor([[0.0, 3.0, 0.0, 0.0]])  # (3)^2 / 9 = 1
    flat = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # 16 / 4 = 4
    assert hoyer_sparsity(one_hot).item() == pytest.approx(1.0)
    assert hoyer_sparsity(flat).item() == pytest.approx(4.0)
    both = torch.stack([one_hot[0], flat[0]])  # mean over tokens
    assert hoyer_sparsity(both).item() == pytest.approx(2.5)
    assert hoyer_sparsity(torch.zeros(2, 5)).item() == 0.0
    # scale invariance
    assert hoyer_sparsity(7 * both).item() == pytest.approx(2.5)


def test_hoyer_gradient_is_finite_on_zero_tokens():
    a = torch.zeros(3, 4, requires_grad=True)
    hoyer_sparsity(a).backward()
    assert torch.isfinite(a.grad).all()


def test_l1_hand_case():
    assert l1_sparsity(torch.tensor([[1.0, -2.0], [0.0, 3.0]])).item() == pytest.approx(3.0)  # (3 + 3) / 2 tokens
    assert l1_sparsity(torch.ones(2, 3, 8)).item() == pytest.approx(8.0)  # summed over units, not averaged
