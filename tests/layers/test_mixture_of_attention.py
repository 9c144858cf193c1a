"""BAM's Mixture of Attention: the batched forward against the per-expert, per-head reference (outputs and
gradients), one expert equals plain attention, the KV cache, and the soft router's record."""

import pytest
import torch
import torch.nn.functional as F

from upcycle.layers import build_router
from upcycle.layers.attention import MixtureOfAttention
from upcycle.layers.reference import naive_mixture_of_attention
from upcycle.layers.rotary import apply_rope, repeat_kv, rope_cos_sin


def moa(experts=3, heads=4, kv=2, head_dim=8, d=24, shared_kv=False, bias=False, seed=0):
    torch.manual_seed(seed)
    module = MixtureOfAttention(d, experts, heads, kv, head_dim, shared_kv=shared_kv, bias=bias, router_init_std=0.5)
    if bias:
        with torch.no_grad():
            for name in ("b_q", "b_k", "b_v", "b_o"):
                getattr(module, name).normal_(0, 0.1)
    return module.double()


def rope_for(t, head_dim, b=1):
    cos, sin = rope_cos_sin(torch.arange(t)[None].expand(b, t), head_dim, 10_000.0, torch.float64)
    return cos, sin


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("experts", "heads", "kv"), [(3, 4, 2), (1, 2, 2), (2, 3, 1)])
def test_matches_the_reference_on_outputs_and_gradients(shared_kv, bias, experts, heads, kv):
    module = moa(experts, heads, kv, shared_kv=shared_kv, bias=bias)
    x = torch.randn(2, 7, module.d_model, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_for(7, module.head_dim, 2)
    fast = module(x, cos, sin)
    slow = naive_mixture_of_attention(module, x, cos, sin)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [x, *module.parameters()])
    grads_slow = torch.autograd.grad((slow * weights).sum(), [x, *module.parameters()])
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b)


def test_one_expert_is_plain_grouped_query_attention():
    module = moa(experts=1, heads=4, kv=2)
    x = torch.randn(2, 5, module.d_model, dtype=torch.float64)
    cos, sin = rope_for(5, module.head_dim)
    q = apply_rope((x @ module.w_q[0].T).view(2, 5, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rope((x @ module.w_k[0].T).view(2, 5, 2, 8).transpose(1, 2), cos, sin)
    v = (x @ module.w_v[0].T).view(2, 5, 2, 8).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)
    expected = y.transpose(1, 2).reshape(2, 5, -1) @ module.w_o[0].T
    torch.testing.assert_close(module(x, cos, sin), expected)


class ListCache:
    """The one method of transformers' Cache the module calls: append keys and values, return all of them."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v, layer_idx):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k, self.v


@pytest.mark.parametrize("shared_kv", [False, True])
def test_decoding_with_a_cache_matches_the_full_forward(shared_kv):
    module = moa(shared_kv=shared_kv)
    x = torch.randn(2, 6, module.d_model, dtype=torch.float64)
    cos, sin = rope_for(6, module.head_dim)
    full = module(x, cos, sin)
    cache = ListCache()
    steps = [module(x[:, :4], cos[:, :4], sin[:, :4], None, cache)]
    for t in (4, 5):  # one new token attends all cached keys: an all-true mask
        mask = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
        steps.append(module(x[:, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1], mask, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    kv_heads = module.num_kv_heads * (1 if shared_kv else module.num_experts)
    assert cache.k.shape == (2, kv_heads, 6, module.head_dim)  # shared KV: the dense model's cache size


def test_soft_attention_router_weights_every_expert():
    router = build_router("soft_attention", d_model=8, num_experts=3)
    routing = router(torch.randn(5, 8))
    assert routing.indices.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(5))
    assert routing.aux_losses == {}
    assert router.spec() == {"name": "soft_attention", "d_model": 8, "num_experts": 3, "init_std": 0.02}


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MixtureOfAttention(16, 2, 3, 2, 8)
