"""upcycle.merge: BTX and BAM (arXiv 2403.07816, 2408.08274) mix a seed and its branches into one MoE.

Dense equivalence (the seed alone, or identical copies with renormalised routing, reproduce the seed exactly),
where each expert comes from, what is averaged, the refusals, and save / load."""

import pytest
import torch

import upcycle
from tests.export.helpers import tiny_llama
from tests.models.helpers import tiny_lm
from upcycle.layers import moe_layers
from upcycle.layers.attention import MixtureOfAttention
from upcycle.models import UpcycleBAMForCausalLM
from upcycle.record import ConversionRecord, attach_record, record_of

VARIANTS = {"btx": {"method": "btx"}, "bam_expert_kv": {"method": "bam"},
            "bam_shared_kv": {"method": "bam", "shared_kv": True}}  # fmt: skip
SEEDS = {
    "upcycle_lm_sequential": lambda seed=0: tiny_lm(parallel=False, seed=seed),
    "upcycle_lm_parallel": lambda seed=0: tiny_lm(parallel=True, seed=seed),
    "llama": lambda seed=0: _seeded(tiny_llama, seed),
}


def _seeded(build, seed):
    torch.manual_seed(seed)
    return build()


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def ids_for(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed_kind", SEEDS)
def test_the_seed_alone_mixes_into_itself(variant, seed_kind):
    seed = SEEDS[seed_kind]()
    merged = upcycle.merge([seed], **VARIANTS[variant])
    check = upcycle.verify(merged, seed, {"input_ids": ids_for(seed)})  # the logits and every FFN / attention layer
    assert check.passed(atol=1e-5, rtol=1e-4), check
    assert len(moe_layers(merged)) == seed.config.num_hidden_layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_copies_with_renormalised_routing_reproduce_the_seed(variant):
    seed = tiny_lm(parallel=True)
    merged = upcycle.merge([seed, seed, seed], **VARIANTS[variant], top_k=2, renormalize=True, router_init_std=1.0)
    check = upcycle.verify(merged, seed, {"input_ids": ids_for(seed)})
    assert check.passed(atol=1e-4, rtol=1e-4), check


def test_raw_top1_probability_scales_the_expert_as_the_paper_does():
    """BAM's default router (top-1, no renormalisation) weights the chosen expert by p < 1: copies are not exact."""
    seed = tiny_lm(parallel=True)
    merged = upcycle.merge([seed, seed], method="btx")
    ids = ids_for(seed)
    assert (logits(merged, ids) - logits(seed, ids)).abs().max() > 1e-3


def test_each_expert_comes_from_its_model_and_the_rest_is_averaged():
    models = [tiny_lm(parallel=True, seed=s) for s in range(3)]
    bam = upcycle.merge(models, method="bam", expert_names=["seed", "a", "b"])
    shared = upcycle.merge(models, method="bam", shared_kv=True)
    btx = upcycle.merge(models, method="btx")
    block = bam.model.layers[1]
    for j, model in enumerate(models):
        dense = model.model.layers[1]
        assert torch.equal(block.mlp.experts.w_gate[j], dense.mlp.gate_proj.weight)
        assert torch.equal(block.mlp.experts.w_down[j], dense.mlp.down_proj.weight)
        assert torch.equal(block.self_attn.w_q[j], dense.self_attn.q_proj.weight)
        assert torch.equal(block.self_attn.w_v[j], dense.self_attn.v_proj.weight)
        assert torch.equal(btx.model.layers[1].mlp.moe.experts.w_up[j], dense.mlp.up_proj.weight)
    mean_k = torch.stack([m.model.layers[1].self_attn.k_proj.weight for m in models]).mean(0)
    torch.testing.assert_close(shared.model.layers[1].self_attn.w_k[0], mean_k)
    assert shared.model.layers[1].self_attn.w_k.shape[0] == 1
    mean_embed = torch.stack([m.model.embed_tokens.weight for m in models]).mean(0)
    torch.testing.assert_close(bam.model.embed_tokens.weight, mean_embed)
    mean_q = torch.stack([m.model.layers[1].self_attn.q_proj.weight for m in models]).mean(0)
    torch.testing.assert_close(btx.model.layers[1].self_attn.q_proj.weight, mean_q)
    assert record_of(bam).merge["expert_names"] == ["seed", "a", "b"]
    assert isinstance(block.self_attn, MixtureOfAttention) and isinstance(bam, UpcycleBAMForCausalLM)
    for model in models:  # inputs untouched
        assert not moe_layers(model)


@pytest.mark.parametrize("seed_kind", list(SEEDS))
@pytest.mark.parametrize("method", ["btx", "bam"])
def test_every_norm_and_the_head_are_the_average_of_all_inputs_seed_included(seed_kind, method):
    """The papers average every non-expert tensor over the N+1 input models: norms and head too (set apart here,
    since fresh models all start with unit norms), in both block layouts."""
    models = [SEEDS[seed_kind](seed=s) for s in range(3)]
    with torch.no_grad():
        for j, model in enumerate(models):
            for name, tensor in model.named_parameters():
                if "norm" in name or "lm_head" in name:
                    tensor.add_(0.1 * (j + 1))
    merged = upcycle.merge(models, method=method)
    state = merged.state_dict()
    names = [n for n, _ in models[0].named_parameters() if "norm" in n or "lm_head" in n]
    assert any("layers.1" in n for n in names)
    for name in names:
        mean = torch.stack([dict(m.named_parameters())[name] for m in models]).mean(0)
        torch.testing.assert_close(state[name], mean, msg=name)


def test_merge_is_deterministic_in_its_seed():
    models = [tiny_lm(seed=s) for s in range(2)]
    a, b = upcycle.merge(models, method="bam", seed=3), upcycle.merge(models, method="bam", seed=3)
    c = upcycle.merge(models, method="bam", seed=4)
    ids = ids_for(models[0])
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert not torch.equal(logits(a, ids), logits(c, ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(variant, tmp_path):
    models = [tiny_lm(parallel=True, seed=s) for s in range(3)]
    merged = upcycle.merge(models, **VARIANTS[variant], router_init_std=0.5)
    upcycle.save(merged, tmp_path / "m")
    loaded = upcycle.load(tmp_path / "m")
    ids = ids_for(models[0])
    assert torch.equal(logits(merged, ids), logits(loaded, ids))
    assert "merge:" in (tmp_path / "m" / "recipe.yaml").read_text()


def test_bad_inputs_are_refused():
    seed = tiny_lm()
    with pytest.raises(ValueError, match="at least one model"):
        upcycle.merge([], method="bam")
    with pytest.raises(ValueError, match="not the seed's architecture"):
        upcycle.merge([seed, tiny_lm(hidden_size=64)], method="btx")
    with pytest.raises(ValueError, match="rms_norm_eps"):
        upcycle.merge([seed, tiny_lm(rms_norm_eps=1e-3)], method="bam")
    with pytest.raises(ValueError, match="is a LlamaForCausalLM but the seed a UpcycleLMForCausalLM"):
        upcycle.merge([seed, tiny_llama(hidden_size=32, vocab_size=259)], method="bam")
    with pytest.raises(ValueError, match="top_k=3 is larger"):
        upcycle.merge([seed, seed], method="bam", top_k=3)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle.merge([upcycle.merge([seed], method="btx")], method="btx")
    with pytest.raises(ValueError, match="invalid merge config"):
        upcycle.merge([seed], method="moefication")
    with pytest.raises(ValueError, match="expert_names names 1"):
        upcycle.merge([seed, seed], method="bam", expert_names=["seed"])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(ValueError, match="merge takes causal LMs of model type llama, upcycle_lm"):
        upcycle.merge([gpt2], method="bam")


def test_bam_config_carries_the_seeds_rope_theta_and_top_k():
    seed = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    bam = upcycle.merge([seed, seed], method="bam", top_k=2, renormalize=True)
    assert bam.config.rope_theta == 500.0
    assert (bam.config.num_experts_per_tok, bam.config.norm_topk_prob, bam.config.num_local_experts) == (2, True, 2)
    assert bam.config.parallel_attention is False


def test_merge_config_from_an_object_a_yaml_file_and_its_merge_section(tmp_path):
    from upcycle.methods.bam.merge import MergeConfig, load_merge_config

    config = MergeConfig(method="btx", top_k=2, router_init_std=0.5, seed=3)
    assert load_merge_config(config) == config
    assert load_merge_config(config, top_k=1).top_k == 1  # keywords override the object
    whole = tmp_path / "merge.yaml"
    whole.write_text("method: btx\ntop_k: 2\n")
    section = tmp_path / "recipe.yaml"
    section.write_text("merge:\n  method: bam\n  shared_kv: true\n")
    assert (load_merge_config(whole).method, load_merge_config(str(whole)).top_k) == ("btx", 2)
    assert (load_merge_config(section).method, load_merge_config(section).shared_kv) == ("bam", True)


def test_refusals_name_the_model_and_what_differs():
    seed = tiny_lm()
    with pytest.raises(ValueError, match=r"model 2 is not the seed's architecture \(tensors that differ: \[\("):
        upcycle.merge([seed, seed, tiny_lm(hidden_size=64)], method="btx")
    with pytest.raises(ValueError, match=r"model 0 is Linear \(model_type None\)"):
        upcycle.merge([torch.nn.Linear(2, 2)], method="btx")


def test_merge_reads_its_config_file_and_keeps_the_tokenizer_origin(tmp_path):
    seed = tiny_lm()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("merge:\n  method: btx\n  top_k: 2\n  renormalize: true\n")
    merged = upcycle.merge([seed, seed], config=recipe)
    assert record_of(merged).merge["method"] == "btx" and record_of(merged).merge["top_k"] == 2
    assert record_of(merged).files is None and record_of(merged).origin is None  # nothing to carry
    attach_record(seed, ConversionRecord(origin="the/seed", files="where/the/tokenizer/is"))
    assert (
        record_of(upcycle.merge([seed], method="bam")).origin,
        record_of(upcycle.merge([seed], method="btx")).files,
    ) == ("the/seed", "where/the/tokenizer/is")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_mixture_records_its_recipe_paper_layers_dtype_and_the_seeds_origin(variant):
    from upcycle.adapters import find_adapter

    seed, branch = (tiny_lm(parallel=False, seed=s).to(torch.bfloat16) for s in range(2))
    attach_record(seed, ConversionRecord(origin="org/seed", revision="r1", files="tokenizer/here"))
    merged = upcycle.merge([seed, branch], **VARIANTS[variant], top_k=2, router_init_std=0.1, seed=5,
                           expert_names=["seed", "code"], backend="eager")  # fmt: skip
    record = record_of(merged)
    method = VARIANTS[variant]["method"]
    paper = {"btx": "https://arxiv.org/abs/2403.07816", "bam": "https://arxiv.org/abs/2408.08274"}[method]
    assert record.merge == {  # the recipe to redo the mix; the compute backend is a runtime choice, not part of it
        "method": method, "shared_kv": variant == "bam_shared_kv", "top_k": 2, "renormalize": False,
        "router_init_std": 0.1, "seed": 5, "expert_names": ["seed", "code"], "router_init_domains": None,
        "router_init_examples": 64, "paper": paper,
    }  # fmt: skip
    assert record.convert is None
    assert (record.origin, record.revision, record.files) == ("org/seed", "r1", "tokenizer/here")
    assert record.dtype == "bfloat16"
    assert record.versions["torch"] == torch.__version__
    if method == "btx":  # the seed's own class and adapter, an MoE at every FFN
        assert record.adapter == find_adapter(seed).name == "hf_llama"
        assert record.source["class"] == type(seed).__name__
        assert sorted(record.layers) == [f"model.layers.{i}.mlp" for i in range(seed.config.num_hidden_layers)]
        for i in range(seed.config.num_hidden_layers):
            layer = record.layers[f"model.layers.{i}.mlp"]
            assert layer["index"] == i
            assert (layer["router"]["num_experts"], layer["router"]["top_k"]) == (2, 2)
            assert layer["experts"]["d_hidden"] == seed.config.intermediate_size
    else:  # upcycle's BAM model, which builds its own layers from its config
        assert record.adapter == "upcycle_bam" and record.layers == {}
        assert record.source["class"] == "UpcycleBAMForCausalLM"
        assert record.source["config"]["num_local_experts"] == 2
        assert record.source["config"]["shared_kv"] is (variant == "bam_shared_kv")
    assert record.source["config"]["hidden_size"] == seed.config.hidden_size


BAM_FIELDS = {"vocab_size": 101, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 77,
              "rms_norm_eps": 1e-5, "hidden_act": "gelu", "tie_word_embeddings": True, "attention_bias": True,
              "mlp_bias": True, "initializer_range": 0.05, "bos_token_id": 3, "eos_token_id": 4,
              "pad_token_id": 5}  # fmt: skip


def test_bam_config_copies_every_architecture_field_of_the_seed():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from upcycle.methods.bam.merge import MergeConfig, bam_config

    cfg = MergeConfig(method="bam", top_k=1)
    seed = LlamaConfig(**BAM_FIELDS, rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    bam = bam_config(seed, 3, cfg)
    assert {field: getattr(bam, field) for field in BAM_FIELDS} == BAM_FIELDS  # none left at the BAM default
    assert (bam.rope_theta, bam.num_local_experts, bam.num_attention_experts) == (123.0, 3, 3)
    # a seed config without the optional fields (no pad token, no head_dim) keeps the BAM defaults for them
    plain = SimpleNamespace(**{k: v for k, v in BAM_FIELDS.items() if k not in ("pad_token_id", "head_dim")},
                            rope_theta=10.0)  # fmt: skip
    bam = bam_config(plain, 2, cfg)
    assert (bam.hidden_size, bam.head_dim, bam.rope_theta) == (48, 8, 10.0)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, {"type_": "x"}])
def test_bam_config_refuses_scaled_rope_and_takes_an_unnamed_type_as_default(rope):
    from types import SimpleNamespace

    from upcycle.methods.bam.merge import MergeConfig, bam_config

    seed = SimpleNamespace(**BAM_FIELDS, rope_parameters={**rope, "rope_theta": 1e4})
    if "rope_type" in rope:
        with pytest.raises(ValueError, match=r"^the seed uses 'linear' RoPE scaling; upcycle's BAM model implements"):
            bam_config(seed, 2, MergeConfig(method="bam"))
    else:  # no rope_type: plain RoPE
        assert bam_config(seed, 2, MergeConfig(method="bam")).rope_theta == 1e4


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("parallel_attention", True),
                                          ("tie_word_embeddings", True), ("rms_norm_eps", 1e-3)])  # fmt: skip
def test_branches_with_another_config_are_refused_with_the_field(field, value):
    seed, branch = tiny_lm(), tiny_lm()
    setattr(branch.config, field, value)  # same tensors, another computation
    with pytest.raises(ValueError, match=rf"^model 1 has {field}={value!r} but the seed has .*; branches must share"):
        upcycle.merge([seed, branch], method="btx")


def test_refusal_messages_in_full(tmp_path):
    with pytest.raises(ValueError, match=r"^merge needs at least one model \(the seed\)$"):
        upcycle.merge([], method="bam")
    seed = tiny_lm()
    with pytest.raises(ValueError, match=r"branches must be copies of the seed$"):
        upcycle.merge([seed, tiny_llama(hidden_size=32, vocab_size=259)], method="bam")
    with pytest.raises(ValueError) as refused:
        upcycle.merge([seed, tiny_lm(hidden_size=64, intermediate_size=96)], method="btx")
    assert str(refused.value).endswith("); branches must be copies of the seed")
    assert str(refused.value).count("', (") == 3  # the first three differing tensors, no more
    listed = tmp_path / "list.yaml"
    listed.write_text("merge: [btx]\n")
    with pytest.raises(ValueError, match=rf"^the merge section of {listed} must be a mapping of keys, got list$"):
        upcycle.merge([seed], config=listed)
    with pytest.raises(FileNotFoundError, match=r"^merge config .*missing.yaml does not exist"):
        upcycle.merge([seed], config=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"^merge config .*list.yaml must hold a mapping of keys"):
        listed.write_text("- btx\n")
        upcycle.merge([seed], config=listed)
