"""Padding is never routed: inside ``real_tokens(attention_mask)`` an MoE layer routes and computes only the real
tokens (padding gets zero), so padding counts in no routing statistic, load-balancing or sparsity loss."""

import torch
import transformers

import upcycle
from upcycle.layers import FFN, MoE, TopKRouter, collect_aux_losses, moe_layers, real_tokens, routing_statistics
from upcycle.train.sparsity import SparsityPenalty

from .helpers import random_experts


def layer() -> MoE:
    torch.manual_seed(0)
    router = TopKRouter(16, 4, top_k=2, capacity_factor=1.5)  # capacity: which tokens count changes who is dropped
    return MoE(router, random_experts(4, 16, 8), shared_expert=FFN(16, 8))


def test_padding_is_zero_and_real_tokens_are_computed_as_alone():
    moe = layer()
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with real_tokens(mask):
        y = moe(x)
    masked = moe.last_routing
    reference = moe(x[mask.bool()])  # the naive way: the 7 real tokens alone, [7, 16]
    alone = moe.last_routing
    assert torch.equal(y[mask == 0], torch.zeros(3, 16))
    torch.testing.assert_close(y[mask.bool()], reference)
    assert masked.indices.shape == (7, 2) and torch.equal(masked.indices, alone.indices)
    for key in ("load_balancing", "z_loss"):  # the aux losses see the real tokens only
        torch.testing.assert_close(masked.aux_losses[key], alone.aux_losses[key])
    assert routing_statistics(masked) == routing_statistics(alone)
    (grad,) = torch.autograd.grad(y.square().sum(), x)  # gradients: the same as the reference's, zero on padding
    (ref_grad,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.equal(grad[mask == 0], torch.zeros(3, 16))


def test_without_padding_or_outside_the_block_every_token_counts():
    moe = layer()
    x = torch.randn(2, 5, 16)
    plain = moe(x)
    with real_tokens(torch.ones(2, 5, dtype=torch.long)):
        torch.testing.assert_close(moe(x), plain)
    with real_tokens(torch.tensor([[1, 1, 0, 0, 0]] * 2)):
        assert moe(torch.randn(3, 5, 16)).abs().sum(-1).ne(0).all()  # another shape: not this mask's tokens
    assert moe.last_routing.indices.shape[0] == 15


def test_a_padded_batch_classifies_each_text_as_alone():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_labels=3)  # fmt: skip
    dense = transformers.BertForSequenceClassification(config).eval()
    moe = upcycle.convert(dense, num_experts=4, top_k=1, progress=False).eval()
    short, long = torch.tensor([[2, 7, 9, 3]]), torch.tensor([[2, 7, 9, 11, 12, 13, 3]])
    batch = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
    mask = (batch != 0).long()
    with torch.no_grad(), real_tokens(mask):
        logits = moe(input_ids=batch, attention_mask=mask).logits
        tokens_routed = [layer.last_routing.indices.shape[0] for _, layer in moe_layers(moe)]
        aux = collect_aux_losses(moe)
    with torch.no_grad():
        torch.testing.assert_close(logits[0], moe(input_ids=short).logits[0])
        torch.testing.assert_close(logits[1], moe(input_ids=long).logits[0])
    assert tokens_routed == [11, 11]  # 4 + 7 real tokens, not the 14 positions
    assert all(torch.isfinite(value) for value in aux.values())


def test_the_sparsity_penalty_ignores_padding():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)  # fmt: skip
    model = transformers.BertModel(config).eval()
    from upcycle.adapters import find_adapter

    penalty = SparsityPenalty(model, find_adapter(model), "l1")
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    with torch.no_grad(), real_tokens((ids != 0).long()):
        model(input_ids=ids, attention_mask=(ids != 0).long())
    padded, _ = penalty.take()
    with torch.no_grad():
        model(input_ids=ids[:, :4])
    alone, _ = penalty.take()
    torch.testing.assert_close(padded, alone)
    penalty.close()
