"""MAC counts against hand formulas: dense layers, attention, upcycled and split MoE models, masks, Soft MoE."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upcycle
from upcycle.adapters import find_adapter
from upcycle.eval import count_macs, flops_fraction
from upcycle.layers import FFN, Experts, MoE, SoftMoERouter, set_backend

from .helpers import FixedRouter, topk_moe

# tiny ViT (tests/conversion/tiny_models.py): 32x32 images, 8x8 patches -> 16 patches + class token
VIT = {"tokens": 17, "patches": 16, "d": 48, "h": 192, "depth": 2, "patch_in": 3 * 8 * 8, "classes": 5}
# tiny Llama: d 32, FFN 64 (gated), 4 query heads and 2 kv heads of 8, vocab 97; example inputs [2, 16]
LLAMA = {"T": 16, "d": 32, "h": 64, "layers": 3, "q": 32, "kv": 16, "vocab": 97}


def vit_parts() -> dict:
    v = VIT
    n, d = v["tokens"], v["d"]
    attention = n * (d * 3 * d + d * d) + 2 * n * n * d  # qkv + proj per token; QKᵀ and AV over all heads
    return {
        "ffn": v["depth"] * n * 2 * d * v["h"],
        "attention": v["depth"] * attention,
        "other": v["patches"] * v["patch_in"] * d + d * v["classes"],  # patch conv + head on the pooled token
    }


def llama_parts() -> dict:
    L = LLAMA
    T, d = L["T"], L["d"]
    projections = T * (d * L["q"] + 2 * d * L["kv"] + L["q"] * d)  # q, k, v, o
    scores = 2 * T * T * L["q"]  # QKᵀ and AV, 4 heads of 8 (GQA reads kv heads twice: same MACs)
    return {
        "ffn": L["layers"] * T * 3 * d * L["h"],  # gate, up, down
        "attention": L["layers"] * (projections + scores),
        "other": T * d * L["vocab"],  # LM head; the embedding is a lookup
    }


def inputs_for(model):
    return find_adapter(model).example_inputs(model, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def llama(dense_llama):
    return dense_llama, inputs_for(dense_llama)


def test_two_layer_mlp_matches_hand_count():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inputs = {"x": torch.randn(3, 8)}
    report = count_macs(model, inputs)
    assert report.total == 8 * 16 + 16 * 4  # biases and ReLU count zero
    assert report.breakdown["other"] == report.total
    assert count_macs(model, inputs, per_sample=False).total == 3 * (8 * 16 + 16 * 4)


def test_convolution_is_counted():
    model = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    report = count_macs(model, {"x": torch.randn(2, 3, 5, 5)})
    assert report.total == 5 * 5 * (3 * 3 * 3) * 4  # output positions × kernel × c_in × c_out


class SDPAAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):  # [b, n, d]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_fused_attention_on_cpu_is_counted():
    """F.scaled_dot_product_attention dispatches to a CPU kernel FlopCounterMode does not know; it must count."""
    n, d = 7, 12
    report = count_macs(SDPAAttention(d, heads=3), {"x": torch.randn(2, n, d)})
    assert report.total == n * 3 * d * d + n * d * d + 2 * n * n * d


def test_dense_vit_matches_hand_count(dense_vit):
    model = dense_vit
    report = count_macs(model, inputs_for(model))
    parts = vit_parts()
    assert report.breakdown["ffn"] == parts["ffn"]
    assert report.breakdown["attention"] == parts["attention"]
    assert report.breakdown["other"] == parts["other"]
    assert report.total == sum(parts.values())
    assert report.per_module["blocks.0.mlp"] == parts["ffn"] / VIT["depth"]


def test_upcycled_vit_counts_two_experts_and_routers(dense_vit):
    dense = dense_vit
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    report = count_macs(moe, inputs_for(dense))
    parts = vit_parts()
    routers = VIT["depth"] * VIT["tokens"] * VIT["d"] * 4
    assert report.breakdown["experts"] == 2 * parts["ffn"]
    assert report.breakdown["routers"] == routers
    assert report.breakdown["ffn"] == 0  # the MoE wrapper is not a dense FFN
    assert report.breakdown["attention"] == parts["attention"]
    assert report.total == sum(parts.values()) + parts["ffn"] + routers
    assert report.dense_equivalent == sum(parts.values())


def test_dense_llama_matches_hand_count(llama):
    dense, inputs = llama
    report = count_macs(dense, inputs)
    parts = llama_parts()
    assert {key: report.breakdown[key] for key in parts} == parts
    assert report.total == sum(parts.values())


def test_upcycled_llama_top2(llama):
    dense, inputs = llama
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    report = count_macs(moe, inputs)
    parts = llama_parts()
    routers = LLAMA["layers"] * LLAMA["T"] * LLAMA["d"] * 4  # d·e per token
    assert report.breakdown["experts"] == 2 * parts["ffn"]
    assert report.breakdown["routers"] == routers
    assert report.total == sum(parts.values()) + parts["ffn"] + routers
    layer = report.moe["model.layers.0.mlp.moe"]
    assert (layer["tokens"], layer["pairs"]) == (LLAMA["T"], 2 * LLAMA["T"])
    assert flops_fraction(moe, dense, inputs) == pytest.approx(report.total / sum(parts.values()), rel=1e-12)
    assert report.dense_equivalent == count_macs(moe, inputs, dense_model=dense).dense_equivalent == sum(parts.values())


@pytest.mark.parametrize("top_k", [4, 2])
def test_neuron_split_llama(llama, top_k):
    """All experts active: exactly the dense FFN + routers; top-2 of 4: half the FFN."""
    dense, inputs = llama
    split = upcycle.convert(dense, "neuron_split", num_experts=4, top_k=top_k, progress=False,
                            partition="random")  # fmt: skip
    report = count_macs(split, inputs)
    parts = llama_parts()
    routers = LLAMA["layers"] * LLAMA["T"] * LLAMA["d"] * 4
    assert report.breakdown["experts"] == parts["ffn"] * top_k / 4
    assert report.breakdown["routers"] == routers
    if top_k == 4:
        assert report.total == count_macs(dense, inputs).total + routers
    assert report.dense_equivalent == sum(parts.values())


def test_count_is_backend_independent_while_the_grouped_buffer_pads(llama):
    dense, inputs = llama
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False, router_init_std=1.0)
    set_backend(moe, "eager")
    eager = count_macs(moe, inputs)
    set_backend(moe, "grouped")
    grouped = count_macs(moe, inputs)
    assert eager.total == grouped.total
    assert eager.breakdown == grouped.breakdown
    for name, layer in eager.moe.items():
        # the eager loop multiplies exactly the executed pairs: the counter agrees with the routed count
        assert layer["measured"] == layer["experts"] + layer["routers"]
        # the grouped backend multiplies a padded [e, c, d] buffer: more than was routed
        assert grouped.moe[name]["measured"] > layer["measured"]


def test_masked_pairs_count_only_what_runs():
    t, d, h, e = 6, 16, 24, 4
    indices = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    mask = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)  # 7 of 12 pairs run
    x = {"x": torch.randn(t, d)}
    full = count_macs(MoE(FixedRouter(d, e, indices), Experts(e, d, h)), x, per_sample=False)
    masked = count_macs(MoE(FixedRouter(d, e, indices, mask), Experts(e, d, h)), x, per_sample=False)
    assert full.breakdown["experts"] == 12 * 2 * d * h
    assert masked.breakdown["experts"] == 7 * 2 * d * h
    assert masked.moe[""]["pairs"] == 7


@pytest.mark.parametrize("backend", ["eager", "grouped"])
def test_capacity_drops_reduce_the_count_proportionally(backend):
    t, d, h = 32, 16, 24
    x = {"x": torch.randn(t, d)}
    moe = topk_moe(d, h, capacity_factor=0.5, backend=backend)
    report = count_macs(moe, x, per_sample=False)
    executed = int(moe.last_routing.executed().sum())
    assert executed < t * 2  # capacity 8 per expert: at most 32 of the 64 pairs run
    moe.router.capacity_factor = None
    unlimited = count_macs(moe, x, per_sample=False)
    assert report.breakdown["experts"] == executed * 2 * d * h
    assert report.breakdown["experts"] / unlimited.breakdown["experts"] == executed / (t * 2)
    assert report.breakdown["routers"] == unlimited.breakdown["routers"] == t * d * 4


def test_soft_moe_count_and_counter_agree():
    b, n, d, h, e, s = 3, 10, 16, 24, 4, 2
    moe = MoE(SoftMoERouter(d, e, slots_per_expert=s), Experts(e, d, h)).eval()
    report = count_macs(moe, {"x": torch.randn(b, n, d)})
    slots = e * s
    assert report.breakdown["experts"] == slots * 2 * d * h  # per example: every slot through its expert
    assert report.breakdown["routers"] == 3 * n * slots * d  # logits + dispatch + combine
    # slots are not padded: the counter, which saw every einsum and bmm, agrees with the analytic count
    assert report.moe[""]["measured"] == report.total


def test_shared_expert_and_gate_are_counted_for_every_token():
    t, d, h, hs = 8, 16, 24, 20
    moe = topk_moe(d, h, k=1, shared_expert=FFN(d, hs, gated=True), shared_expert_gate=True)
    report = count_macs(moe, {"x": torch.randn(t, d)}, per_sample=False)
    assert report.breakdown["shared_experts"] == t * (3 * d * hs + d)
    assert report.breakdown["experts"] == t * 1 * 2 * d * h
    assert report.total == sum(report.breakdown.values())
    assert report.dense_equivalent is None  # a hand-built layer has no dense source to compare with


def test_count_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    model[1].eval()
    count_macs(model, {"x": torch.randn(2, 4)})
    assert model.training and model[0].training and not model[1].training


def test_flops_fraction_counts_both_models_with_the_given_forward(llama):
    dense, inputs = llama
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, progress=False)

    def first_tokens(model, batch):  # a forward of the caller's choosing: here, the first 4 tokens only
        return model(input_ids=batch["input_ids"][:, :4])

    moe_macs = count_macs(moe, inputs, forward=first_tokens).total
    expected = moe_macs / count_macs(dense, inputs, forward=first_tokens).total
    assert flops_fraction(moe, dense, inputs, forward=first_tokens) == pytest.approx(expected, rel=1e-12)


def test_bert_ffn_is_found_by_its_adapters_sites():
    from tests.conversion.tiny_models import build

    bert = build("bert")  # BertIntermediate / BertOutput: class names alone do not say "FFN"
    T, d, h, layers = 8, 32, 64, 3
    ids = torch.randint(0, 97, (2, T))
    report = count_macs(bert, {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long)})
    assert report.breakdown["ffn"] == layers * T * 2 * d * h  # up (intermediate) and down (output) projections
    assert report.per_module["encoder.layer.0.output"] == T * h * d
    assert report.breakdown["other"] == d * d  # the pooler, on the first token
    as_dict = report.to_dict()
    assert as_dict["total"] == report.total and as_dict["breakdown"] == report.breakdown


def test_granular_upcycling_knows_its_dense_ffn(llama):
    dense, inputs = llama
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=2, granularity=2, progress=False)
    report = count_macs(moe, inputs)  # 4 shards of half width: the dense FFN is twice an expert's width
    assert report.dense_equivalent == sum(llama_parts().values())
