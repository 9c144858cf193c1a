"""Tiny Llama-family models, conversion and round-trip checks shared by the Hugging Face MoE and GGUF export tests."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import upcycle
from upcycle.layers import FFN, Experts, moe_layers
from upcycle.record import record_of

VOCAB, WIDTH, HIDDEN, EXPERTS = 100, 32, 64, 4
SIZES = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def tiny_llama(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**SIZES, **overrides})).eval()


def tiny_qwen3(**overrides) -> Qwen3ForCausalLM:
    """Qwen3 with head_dim apart from hidden_size / heads and random (not unit) q/k norm weights, so both matter."""
    model = Qwen3ForCausalLM(Qwen3Config(**{**SIZES, "head_dim": 16, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1.0, 0.5)
            layer.self_attn.k_norm.weight.normal_(1.0, 0.5)
    return model


def converted(dense: nn.Module | None = None, method: str = "sparse_upcycling", **overrides) -> nn.Module:
    """E noisy copies (experts differ) with a decisive router (init std 0.02 would route almost uniformly)."""
    options = {"noise_std": 0.01} if method == "sparse_upcycling" else {}
    arguments = {"num_experts": EXPERTS, "top_k": 2, "progress": False, **options, **overrides}
    model = upcycle.convert(tiny_llama() if dense is None else dense, method, **arguments).eval()
    with torch.no_grad():
        for _, layer in moe_layers(model):
            if hasattr(layer.router, "gate"):
                layer.router.gate.weight.normal_(std=1.0)
    return model


def sigmoid_routed(dense: nn.Module | None = None, **overrides) -> nn.Module:
    """Sigmoid routers with a non-zero selection bias that changes which experts tokens choose."""
    model = converted(dense, router_type="sigmoid", **overrides)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.router.expert_bias.normal_(std=0.5)
    return model


def first_moe(model: nn.Module):
    return moe_layers(model)[0][1]


def add_shared_expert(model: nn.Module, width: int = 24, gate: bool = True, **ffn) -> nn.Module:
    for _, layer in moe_layers(model):
        layer.shared_expert = FFN(WIDTH, width, **{"activation": "silu", "gated": True, "bias": False, **ffn})
        layer.shared_expert_gate = nn.Linear(WIDTH, 1, bias=False) if gate else None
    return model


def assert_round_trip(model: nn.Module, directory, expected_class: str) -> float:
    """from_pretrained loads every tensor (none missing or left over), same logits, same greedy continuation."""
    loaded, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    loaded.eval()
    assert type(loaded).__name__ == expected_class
    # tools that pick the class by name (pipelines, vLLM) read it from the config
    assert json.loads((directory / "config.json").read_text())["architectures"] == [expected_class]
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        diff = (model(ids).logits - loaded(ids).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = ids[:1, :5]
    ours = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    return diff


def assert_no_training_noise(directory) -> None:
    """The loaded model computes the same in training mode: the export adds no router jitter or attention dropout
    that the source does not have, which would change the model as soon as a user fine-tunes it."""
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        evaluated = loaded.eval()(ids).logits
        trained = loaded.train()(ids).logits
    torch.testing.assert_close(trained, evaluated)


# settings that differ from the targets' defaults, so a field that is not carried over shows
BACKBONE = dict(max_position_embeddings=64, rms_norm_eps=1e-5, attention_dropout=0.1, initializer_range=0.05,
                bos_token_id=5, eos_token_id=6, pad_token_id=0)  # fmt: skip


def assert_backbone_config(directory, source) -> None:
    """The exported config.json holds the source's backbone settings under the same names."""
    config = json.loads((directory / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", *BACKBONE):  # fmt: skip
        assert config[key] == getattr(source.config, key), key


def tensor_names(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


def tensor_dtypes(directory) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in load_file(directory / "model.safetensors").items()}


def assert_provenance(model: nn.Module, directory, format: str) -> dict:
    """The export note says what was written from what, and the source's generation settings come along."""
    note = json.loads((directory / "upcycle_export.json").read_text())
    record = record_of(model)
    moe = sorted(spec["index"] for spec in record.layers.values())
    assert note["format"] == format
    assert note["source"] == {"adapter": record.adapter, "class": type(model).__name__,
                              "model_type": model.config.model_type}  # fmt: skip
    assert note["moe_layers"] == moe
    assert note["dense_layers"] == [i for i in range(model.config.num_hidden_layers) if i not in moe]
    assert note["convert"] == record.convert
    generation = GenerationConfig.from_pretrained(directory)  # generate() stops on the source's eos
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(generation, token) == getattr(model.generation_config, token)
    return note


def assert_refused(export, model, tmp_path, match: str, names: tuple[str, ...]) -> None:
    """Refused before anything is written, with a message that names the target (``names``: how the exporter or
    the format registry spells it) and says why (``match``)."""
    with pytest.raises(ValueError, match=match) as refused:
        export(model, tmp_path / "out")
    target = "|".join(re.escape(name) for name in names)
    assert re.match(rf"cannot export (to|as) ({target}): ", str(refused.value)), refused.value
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary sibling


# ---- refusals -----------------------------------------------------------------------------------------------------
def with_router_bias(model):
    first_moe(model).router.gate = nn.Linear(WIDTH, EXPERTS, bias=True)
    return model


def with_shared_bias(model):
    first_moe(model).experts.shared_bias = nn.Parameter(torch.zeros(WIDTH))
    return model


def with_hidden_norm(model):
    experts = first_moe(model).experts
    experts.norm_weight = nn.Parameter(torch.ones(EXPERTS, HIDDEN))
    experts.norm_bias, experts.hidden_norm_eps = nn.Parameter(torch.zeros(EXPERTS, HIDDEN)), 1e-5
    return model


def with_plain_experts(model):
    first_moe(model).experts = Experts(EXPERTS, WIDTH, HIDDEN, activation="silu", gated=False, bias=False)
    return model


def gpt2():
    dense = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)
    )
    return converted(dense.eval())


REFUSALS = {
    "partial": (lambda: converted(layers=[1]), r"layers \[0, 2\] are still dense.*export_qwen2_moe"),
    "not renormalised": (lambda: converted(router_renormalize=False), r"renormalize=False.*router_renormalize"),
    "unit weights": (lambda: converted(method="neuron_split"), "unit_weights"),
    "router bias": (lambda: with_router_bias(converted()), "router has a bias"),
    "capacity": (lambda: converted(router_capacity_factor=1.0), "capacity_factor=1.0"),
    "soft router": (lambda: converted(router_type="soft"), "SoftMoERouter, not token-choice top-k"),
    "expert biases": (lambda: converted(tiny_llama(mlp_bias=True)), r"experts have biases .*mlp_bias=True"),
    "shared bias": (lambda: with_shared_bias(converted()), "shared output bias"),
    "hidden norm": (lambda: with_hidden_norm(converted()), "hidden LayerNorm"),
    "shared expert": (lambda: add_shared_expert(converted()), "shared expert.*export_qwen2_moe"),
    "attention bias": (
        lambda: converted(tiny_llama(attention_bias=True)),
        "attention_bias=True.*no projection has a bias",
    ),
    "adapter": (gpt2, "'hf_gpt2' adapter export as 'hf_generic'"),
    "not converted": (tiny_llama, "no conversion record.*upcycle.convert"),
    "activation": (lambda: converted(tiny_llama(hidden_act="gelu")), "activation is 'gelu'.*hidden_act='silu'"),
    "plain experts": (lambda: with_plain_experts(converted()), "plain silu FFNs.*SiLU-gated"),
}


# ---- a tokenizer next to the model ---------------------------------------------------------------------------------
def save_tiny_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer trained in-session (34 tokens, ids below VOCAB), saved as transformers v5 saves it
    (tokenizer.json + a tokenizer_config.json naming the class TokenizersBackend)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(directory)


def with_tokenizer(model: nn.Module, directory) -> nn.Module:
    """``model`` saved and loaded again with the tiny tokenizer in its folder, as a user's converted model is."""
    upcycle.save(model, directory)
    save_tiny_tokenizer(directory)
    return upcycle.load(directory)
