"""MAC counts against hand formulas: dense layers, attention, upcycled and split MoE models, masks, Soft MoE."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upcycle
from upcycle.adapters import find_adapter
from upcycle.eval import count_macs, flops_fraction
from upcycle.layers import FFN, DualPathExperts, Experts, MoE, SoftMoERouter, set_backend

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
    # the layer is the whole model: its shared FFN is part of it, not a dense FFN of its own
    assert report.breakdown["ffn"] == report.breakdown["other"] == 0
    assert report.per_module == {"": report.total}
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


# ---- which module a MAC is charged to ----------------------------------------------------------------------------
def named_block(class_name):
    """A module of class ``class_name`` holding one Linear(8, 5): 40 MACs per token."""
    return type(class_name, (nn.Module,), {"__init__": _block_init, "forward": lambda self, x: self.fc(x)})()


def _block_init(self):
    nn.Module.__init__(self)
    self.fc = nn.Linear(8, 5)


@pytest.mark.parametrize(
    ("class_name", "category"),
    [("Mlp", "ffn"), ("GatedMLP", "ffn"), ("FeedForward", "ffn"), ("FFN", "ffn"),
     ("MultiHeadSelfAttention", "attention"), ("WindowAttn", "attention"),
     ("NormMlpClassifierHead", None), ("AttentionPoolHead", None), ("BertPreTrainingHeads", None), ("Block", None)],
)  # fmt: skip
def test_module_class_names_choose_the_category(class_name, category):
    """Without an adapter, a module's class name says attention / FFN; heads are "other" whatever else they say."""
    model = nn.Sequential(nn.Linear(4, 8), named_block(class_name))  # 32 MACs in the stem, 40 in the block
    report = count_macs(model, {"x": torch.randn(3, 4)})
    expected = dict.fromkeys(("experts", "routers", "shared_experts", "attention", "ffn"), 0.0)
    expected["other"] = 32.0 + (40.0 if category is None else 0.0)
    if category is not None:
        expected[category] = 40.0
    assert report.breakdown == expected
    assert report.per_module == ({} if category is None else {"1": 40.0})


class TorchAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):  # [b, n, d]
        return self.attn(x, x, x, need_weights=False)[0]


def test_torch_multihead_attention_is_attention_not_a_head():
    n, d = 7, 12
    report = count_macs(TorchAttention(d, heads=3), {"x": torch.randn(2, n, d)})
    hand = n * 3 * d * d + n * d * d + 2 * n * n * d  # in projection (q, k, v), out projection, QKᵀ and AV
    assert report.breakdown["attention"] == report.per_module["attn"] == report.total == hand


def test_the_root_is_never_one_ffn():
    """A whole model whose class is named like an FFN (an MLP-Mixer) is not charged as one."""
    model = named_block("MlpMixer")
    report = count_macs(model, {"x": torch.randn(2, 8)})
    assert report.breakdown["other"] == report.total == 40
    assert report.breakdown["ffn"] == 0 and report.per_module == {}


class Attention(nn.Module):
    """An attention-like module whose output projection is an MoE layer (as a MoE-fied projection would be)."""

    def __init__(self, d, h, hs):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = topk_moe(d, h, e=4, k=2, shared_expert=FFN(d, hs))

    def forward(self, x):  # [t, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(x=q + k + v)  # by keyword: the MoE layer's input is found either way


def test_a_module_holding_an_moe_layer_is_charged_without_it():
    t, d, h, hs, e = 6, 16, 24, 20, 4
    report = count_macs(nn.Sequential(Attention(d, h, hs)), {"x": torch.randn(t, d)}, per_sample=False)
    experts, routers, shared = t * 2 * 2 * d * h, t * d * e, t * 2 * d * hs  # top-2, gate d·e, plain shared FFN
    assert report.per_module == {"0": t * d * 3 * d, "0.out": experts + routers + shared}
    assert report.breakdown["attention"] == t * d * 3 * d
    assert (report.breakdown["experts"], report.breakdown["routers"]) == (experts, routers)
    assert report.breakdown["shared_experts"] == shared
    assert report.breakdown["other"] == 0 and report.breakdown["ffn"] == 0
    assert report.moe["0.out"]["tokens"] == t


class Twice(nn.Module):
    """Runs the same FFN and the same MoE layer twice per forward (weight sharing, as in ALBERT-like models)."""

    def __init__(self, mlp, moe):
        super().__init__()
        self.mlp, self.moe = mlp, moe

    def forward(self, x):
        x = self.moe(self.mlp(x))
        return self.moe(x=self.mlp(x))


def test_a_module_run_twice_is_charged_twice():
    t, d, h, e = 6, 16, 24, 4
    indices = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    mask = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)  # 7 of 12 pairs run
    moe = MoE(FixedRouter(d, e, indices, mask), Experts(e, d, h))
    report = count_macs(Twice(FFN(d, 2 * d), moe), {"x": torch.randn(t, d)}, per_sample=False)
    mlp = 2 * t * 2 * d * (2 * d)
    assert report.per_module["mlp"] == report.breakdown["ffn"] == mlp
    layer = report.moe["moe"]
    assert (layer["tokens"], layer["pairs"]) == (2 * t, 2 * 7)
    assert layer["experts"] == report.breakdown["experts"] == 2 * 7 * 2 * d * h
    assert report.breakdown["other"] == 0  # every measured MAC is attributed: the FFN's second call included


def test_slot_mixing_of_a_soft_moe_run_twice_is_charged_twice():
    b, n, d, h, e, s = 2, 5, 8, 12, 3, 2
    moe = MoE(SoftMoERouter(d, e, slots_per_expert=s), Experts(e, d, h)).eval()
    report = count_macs(Twice(nn.Identity(), moe), {"x": torch.randn(b, n, d)})
    slots = e * s
    assert report.breakdown["routers"] == 2 * 3 * n * slots * d  # logits + dispatch + combine, per call
    assert report.breakdown["experts"] == 2 * slots * 2 * d * h
    assert report.moe["moe"]["pairs"] == 2 * slots
    assert report.breakdown["other"] == 0


def test_dual_path_experts_charge_each_group_at_its_width():
    """SpheroMoE-style core + universal experts behind a slot router: every slot of every example runs through its
    expert, core ones at width h, universal ones at h_u; the dense FFN a split stands for is of the core's kind."""
    b, n, d, h, h_u, e_c, e_u, s = 3, 5, 8, 12, 4, 2, 3, 2
    experts = DualPathExperts.create(e_c, e_u, d, h, h_u, gated=True)
    moe = MoE(SoftMoERouter(d, e_c + e_u, slots_per_expert=s), experts).eval()
    dense_width = 20
    moe.register_buffer("hidden_units", torch.arange(dense_width).view(e_c, -1))  # a split of a 20-wide FFN
    report = count_macs(moe, {"x": torch.randn(b, n, d)})  # per example
    expert_macs = s * (e_c * 3 * d * h + e_u * 3 * d * h_u)
    routers = 3 * n * (e_c + e_u) * s * d
    assert report.breakdown["experts"] == expert_macs
    assert report.breakdown["routers"] == routers
    assert report.total == expert_macs + routers
    assert report.dense_equivalent == n * 3 * d * dense_width  # gated, like the core experts


def test_an_upcycling_record_without_granularity_means_whole_copies():
    from upcycle.record import ConversionRecord, attach_record

    t, d, h = 5, 16, 24
    moe = nn.Sequential(topk_moe(d, h, e=4, k=2))
    attach_record(moe, ConversionRecord(convert={"method": "sparse_upcycling", "options": {}}))
    report = count_macs(moe, {"x": torch.randn(t, d)}, per_sample=False)
    assert report.dense_equivalent == t * 2 * d * h  # each expert is a copy of the dense FFN: its width is h


def test_the_dense_model_is_counted_with_the_given_forward():
    t, d, h = 6, 16, 24
    moe, dense = topk_moe(d, h, e=4, k=2), FFN(d, h)

    def first_two(model, batch):
        return model(batch["x"][:2])

    report = count_macs(moe, {"x": torch.randn(t, d)}, per_sample=False, forward=first_two, dense_model=dense)
    assert report.moe[""]["tokens"] == 2
    assert report.dense_equivalent == 2 * 2 * d * h


def test_a_given_forward_is_what_is_counted():
    report = count_macs(nn.Linear(8, 4), {"x": torch.randn(3, 8)}, per_sample=False,
                        forward=lambda model, batch: model(batch["x"][:1]))  # fmt: skip
    assert report.total == 8 * 4


def test_a_timm_model_is_run_through_its_adapter(dense_vit):
    """The adapter passes the image alone: other entries of a batch (a sample index) are not model inputs."""
    x = inputs_for(dense_vit)["x"]
    report = count_macs(dense_vit, {"x": x, "index": torch.arange(x.shape[0])})
    assert report.total == sum(vit_parts().values())


def test_inputs_follow_the_model_to_its_device():
    model = nn.Sequential(nn.Linear(8, 4)).to("meta")  # a device other than the inputs'; no data needed to count
    assert count_macs(model, {"x": torch.randn(3, 8)}).total == 8 * 4


def test_an_moe_at_an_adapters_ffn_site_is_charged_as_the_moe_alone():
    """BERT converted in its middle layer: the adapter still names ``intermediate`` an FFN site, but it now wraps the
    MoE layer; the dense FFNs around it and every attention keep their own charge."""
    from tests.conversion.tiny_models import build

    T, d, h, layers, e = 8, 32, 64, 3, 4
    moe = upcycle.convert(build("bert"), "sparse_upcycling", num_experts=e, top_k=2, layers=[1], progress=False)
    ids = torch.randint(0, 97, (2, T))
    report = count_macs(moe, {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long)})
    attention = T * 4 * d * d + 2 * T * T * d  # q, k, v, o projections; QKᵀ and AV
    dense_ffn = {f"encoder.layer.{i}.{part}": T * d * h for i in (0, 2) for part in ("intermediate", "output")}
    experts, routers = 2 * T * 2 * d * h, T * d * e
    assert report.per_module == {
        "encoder.layer.1.intermediate.moe": experts + routers,
        **{f"encoder.layer.{i}.attention": attention for i in range(layers)},
        **dense_ffn,
        "encoder.layer.1.output": 0,  # its down projection moved into the experts; the norm counts zero
    }
    ffn = sum(dense_ffn.values())
    assert report.breakdown == {"experts": experts, "routers": routers, "shared_experts": 0,
                                "attention": layers * attention, "ffn": ffn, "other": d * d}  # fmt: skip
