"""Every Hugging Face family end to end on a tiny random model: convert -> per-layer verify (and a broken expert
fails it) -> ``export --format auto`` (the exact MoE twin, else the generic remote-code class) -> reload with
transformers' Auto class -> the same logits and the same greedy generation with a KV cache."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

import upcycle
from upcycle.adapters import adapter_of
from upcycle.errors import UserError
from upcycle.export import chosen_format, export
from upcycle.layers import FFN, moe_layers, set_tau, set_top_k

from .hf_families import HF_FAMILIES, build_hf, is_causal_lm
from .test_verify import busiest_expert

AUTO_CLASS = {True: transformers.AutoModelForCausalLM, False: transformers.AutoModel}


def upcycled(dense: torch.nn.Module, **options) -> torch.nn.Module:
    options = {"num_experts": 4, "top_k": 2, "router_init_std": 1.0, **options}
    return upcycle.convert(dense, "sparse_upcycling", progress=False, **options)


def token_ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(1))  # no special tokens


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def family(request):
    return request.param


def test_the_family_converts_dense_equivalent_and_a_broken_expert_fails(family):
    dense = build_hf(family)
    moe = upcycled(dense)
    correct = upcycle.verify(moe, dense)
    assert correct.passed(atol=1e-4, rtol=1e-4), correct
    assert len(correct.per_layer) == 2  # both layers converted, each compared with its dense FFN
    name, expert = busiest_expert(moe, dense)
    with torch.no_grad():
        moe.get_submodule(name).experts.w_down[expert].mul_(1.5)
    broken = upcycle.verify(moe, dense)
    assert not broken.passed(atol=1e-4, rtol=1e-4) and name.startswith(broken.worst_layer), broken


def test_auto_export_reloads_with_equal_logits_and_cached_generation(family, tmp_path):
    dense = build_hf(family)
    moe = upcycled(dense)
    export(moe, tmp_path / "out", format="auto")
    assert chosen_format(tmp_path / "out") == HF_FAMILIES[family][3]
    causal = is_causal_lm(family)
    reloaded = AUTO_CLASS[causal].from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = token_ids()
    with torch.no_grad():
        ours = adapter_of(moe).outputs(moe, {"input_ids": ids})
        theirs = adapter_of(moe).outputs(reloaded, {"input_ids": ids})
    assert (ours - theirs).abs().max() <= 1e-4
    if causal:
        prompt = ids[:1, :5]
        kwargs = {"max_new_tokens": 8, "do_sample": False, "use_cache": True, "pad_token_id": 0}
        assert torch.equal(moe.generate(prompt, **kwargs), reloaded.generate(prompt, **kwargs))


def test_a_converted_eval_model_stays_in_eval_mode():
    """The MoE wrapper replaces an FFN whose output dropout (GPT-2 resid_pdrop) must not fire in inference."""
    moe = upcycled(build_hf("gpt2"))
    assert not any(module.training for module in moe.modules())
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, moe(ids).logits)


def test_the_generic_class_needs_trust_remote_code(tmp_path):
    export(upcycled(build_hf("gemma")), tmp_path / "out", format="hf_generic")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "upcycle_moe" and config["dense_model_type"] == "gemma"
    with pytest.raises(ValueError, match="trust_remote_code"):  # never a dense Gemma without its experts
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)


def test_the_generic_class_answers_the_family_s_aliases(tmp_path):
    """GPT-2's config stores n_embd; its modelling code also reads hidden_size: the flattened config answers both."""
    export(upcycled(build_hf("gpt2")), tmp_path / "out", format="hf_generic")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert config.n_embd == config.hidden_size == 32 and config.num_hidden_layers == 2


def test_a_partial_conversion_with_a_shared_expert_round_trips(tmp_path):
    moe = upcycled(build_hf("gemma2"), layers=[1])
    layer = moe.model.layers[1].mlp.moe  # a sigmoid-gated shared expert, as Qwen2-MoE has
    torch.manual_seed(2)
    layer.shared_expert = FFN(32, 16, "gelu_tanh", gated=True, bias=False)
    layer.shared_expert_gate = torch.nn.Linear(32, 1, bias=False)
    export(moe, tmp_path / "out", format="hf_generic")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["upcycle_moe"]["layers"].keys() == {
        "model.layers.1.mlp"
    }
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = token_ids()
    with torch.no_grad():
        assert (moe(ids).logits - reloaded(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["d2dmoe", "moefication"])
def test_d2dmoe_and_moefication_encoders_round_trip(method, tmp_path):
    """The MLP routers at an operating point that skips experts: dynamic-k at tau 0.5, top-2 of 4."""
    moe = upcycle.convert(build_hf("roberta"), method, num_experts=4, progress=False)
    if method == "d2dmoe":
        set_tau(moe, 0.5)
    else:
        set_top_k(moe, 2)
    export(moe, tmp_path / "out", format="hf_generic")
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = token_ids()
    with torch.no_grad():
        ours, theirs = moe(ids).last_hidden_state, reloaded(ids).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-4
    routing = moe_layers(moe)[0][1].last_routing
    executed = routing.mask.sum(-1) if routing.mask is not None else torch.full((1,), routing.indices.shape[-1])
    assert executed.float().mean() < 4  # some experts skipped: the comparison covers the router's choice


def test_what_the_generic_class_cannot_compute_is_refused_before_writing(tmp_path):
    moe = upcycled(build_hf("gemma"), router_capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity"):
        export(moe, tmp_path / "out", format="hf_generic")
    assert not (tmp_path / "out").exists()


def test_a_structure_change_beyond_the_moe_layers_is_refused(tmp_path):
    moe = upcycled(build_hf("phi3"))
    moe.model.layers[0].self_attn.o_proj = torch.nn.Sequential(moe.model.layers[0].self_attn.o_proj)
    with pytest.raises(ValueError, match=r"structure differs .*model\.layers\.0\.self_attn\.o_proj"):
        export(moe, tmp_path / "out", format="hf_generic")


def test_a_tensor_no_moe_layer_holds_stops_the_conversion(monkeypatch):
    """No silent drops: an adapter that reads only part of an FFN would lose the rest; the conversion names it."""
    dense = build_hf("gpt_neox")
    adapter = adapter_of(dense)
    reader = type(adapter).read_ffn

    def without_down_bias(self, model, site):
        ffn = reader(self, model, site)
        ffn.b_down = None  # as if the adapter forgot the down projection's bias
        return ffn

    monkeypatch.setattr(type(adapter), "read_ffn", without_down_bias)
    with pytest.raises(ValueError, match=r"drop 2 source tensor\(s\).*dense_4h_to_h\.bias"):
        upcycled(dense)


def test_the_generic_class_knows_every_activation_upcycle_has():
    from upcycle.export.remote import modeling_upcycle_moe
    from upcycle.layers.activations import ACTIVATIONS
    from upcycle.layers.routers.mlp import ACTIVATIONS as ROUTER_ACTIVATIONS

    assert modeling_upcycle_moe.ACTIVATIONS.keys() == ACTIVATIONS.keys()
    assert modeling_upcycle_moe.ROUTER_ACTIVATIONS == ROUTER_ACTIVATIONS
    x = torch.linspace(-4, 4, 33)
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(modeling_upcycle_moe.ACTIVATIONS[name](x), fn(x)), name


def test_the_cli_export_auto_says_which_format_it_chose(tmp_path, capsys):
    from upcycle.cli import main

    upcycle.save(upcycled(build_hf("gpt_neox")), tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), "--format", "auto", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().endswith("(hf_generic)")


FAMILIES_DOC = Path(__file__).resolve().parents[2] / "docs" / "families.md"


def exports_as(moe: torch.nn.Module, format: str) -> bool:
    """Whether ``format``'s writer stores the model (every writer checks before it writes)."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            export(moe, Path(directory) / "out", format=format)
        except ValueError:
            return False
    return True


def render_families() -> str:
    """docs/families.md: each family's adapter, the exact twins that store its conversion (all layers, top-2 of 4,
    renormalised), what ``--format auto`` writes (asserted above), from the adapters and writers themselves."""
    rows = []
    for family, (model_class, _, _, auto) in HF_FAMILIES.items():
        moe = upcycled(build_hf(family))
        adapter = adapter_of(moe)
        exact = [f for f in adapter.export_formats if exports_as(moe, f)]
        checks = "logits ≤ 1e-4, cached greedy generation equal" if is_causal_lm(family) else "outputs ≤ 1e-4"
        twins = ", ".join(f"`{f}`" for f in exact) or "–"
        rows.append(f"| {family} | `{model_class}` | `{adapter.name}` | {twins} | `{auto}` | {checks} |")
    return "\n".join([
        "# Families and their exports",
        "",
        "Generated from the adapters by `python -m tests.conversion.test_hf_families`; every row is a tiny random",
        "model of the family that `tests/conversion/test_hf_families.py` converts (4 experts, top-2), checks layer by",
        "layer with `upcycle.verify` (a broken expert fails it), exports with `--format auto` and reloads with",
        "transformers' Auto class (`trust_remote_code=True` for `hf_generic`). *Exact twins*: the transformers MoE",
        "classes the adapter says store the model exactly (the writer may still refuse a conversion they cannot",
        "express, e.g. Mixtral a partial one; `auto` then tries the next). Otherwise `hf_generic` writes the family's",
        "own class with MoE layers as remote code. timm families export as `timm` (see",
        "[architecture.md](architecture.md#supported-models--methods)).",
        "",
        "| family | dense class | adapter | exact twins | `--format auto` writes | round trip tested |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip


def test_the_families_doc_is_generated_from_the_adapters():
    assert FAMILIES_DOC.read_text() == render_families(), "docs/families.md is stale: run the module"


if __name__ == "__main__":
    FAMILIES_DOC.write_text(render_families())
    print(f"wrote {FAMILIES_DOC}")


def test_a_gguf_architecture_for_another_format_is_refused(tmp_path):
    with pytest.raises(UserError, match="--arch chooses the GGUF architecture; drop it for --format mixtral"):
        export(upcycled(build_hf("llama")), tmp_path / "out", format="mixtral", arch="llama")
    assert not (tmp_path / "out").exists()
