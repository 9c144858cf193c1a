"""What llama.cpp's converter and older loaders need from the Mixtral, Qwen2-MoE and Qwen3-MoE exports: the output
head even when tied, a stand-in shared expert that stays finite in llama.cpp's arithmetic, a tokenizer class they
know, a top-level rope_theta, num_experts_per_tok always, and the source's dtype."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer

import upcycle

from .helpers import (
    VOCAB,
    assert_round_trip,
    converted,
    save_tiny_tokenizer,
    tensor_dtypes,
    tiny_llama,
    tiny_qwen3,
    with_tokenizer,
)

DENSE = {"mixtral": tiny_llama, "qwen2_moe": tiny_llama, "qwen3_moe": tiny_qwen3}
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
FORMATS = pytest.mark.parametrize("format", list(DENSE))


def export(format, tmp_path, top_k=2, **dense):
    model = converted(DENSE[format](**dense), top_k=top_k)
    return model, upcycle.export(model, tmp_path / format, format=format)


@FORMATS
def test_the_output_head_is_written_when_tied(format, tmp_path):
    """llama.cpp's converter writes output.weight only from lm_head.weight, and its Qwen2-MoE loader requires it."""
    model, out = export(format, tmp_path, tie_word_embeddings=True)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("lm_head.weight"), model.get_input_embeddings().weight)
    assert_round_trip(model, out, CLASSES[format])


@FORMATS
def test_older_loaders_find_rope_theta_and_the_top_k(format, tmp_path):
    """transformers 4.x reads rope_theta at the top level (v5 only writes rope_parameters); k is always written."""
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    model, out = export(format, tmp_path, top_k=1, rope_parameters=rope)
    config = json.loads((out / "config.json").read_text())
    assert (config["rope_theta"], config["rope_parameters"], config["num_experts_per_tok"]) == (5000.0, rope, 1)
    assert_round_trip(model, out, CLASSES[format])  # v5 still reads the file, the extra fields included


@FORMATS
def test_the_source_dtype_is_kept(format, tmp_path):
    model = converted(DENSE[format]().to(torch.bfloat16))
    out = upcycle.export(model, tmp_path / format, format=format)
    assert set(tensor_dtypes(out).values()) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@FORMATS
def test_the_tokenizer_loads_as_a_fast_tokenizer(format, tmp_path):
    model = with_tokenizer(converted(DENSE[format]()), tmp_path / "saved")
    out = upcycle.export(model, tmp_path / format, format=format)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    save_tiny_tokenizer(tmp_path / "reference")
    text = "the cat and a dog"
    ids = AutoTokenizer.from_pretrained(out)(text).input_ids
    assert ids == AutoTokenizer.from_pretrained(tmp_path / "reference")(text).input_ids and max(ids) < VOCAB


def llama_cpp_shared_expert(handle, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's qwen2moe shared-expert branch (src/models/qwen2moe.cpp) on normalised hidden states x [n, d]:
    the sigmoid gate is computed as silu(g) / g."""
    weight = lambda name: handle.get_tensor(prefix + name).float()  # noqa: E731
    g = x @ weight("shared_expert_gate.weight").T  # [n, 1]
    gate = F.silu(g) / g
    hidden = F.silu(x @ weight("shared_expert.gate_proj.weight").T) * (x @ weight("shared_expert.up_proj.weight").T)
    return (hidden @ weight("shared_expert.down_proj.weight").T) * gate  # [n, d]


def test_the_stand_in_shared_expert_adds_zero_in_llama_cpp(tmp_path):
    """Where our model has no shared expert, the one Qwen2-MoE requires adds exactly zero in transformers (tested by
    the round trips) and in llama.cpp, whose sigmoid would turn a zero gate into 0 / 0."""
    _, out = export("qwen2_moe", tmp_path)
    x = torch.randn(64, 32)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        for layer in range(3):
            contribution = llama_cpp_shared_expert(handle, f"model.layers.{layer}.mlp.", x)
            assert torch.isfinite(contribution).all() and not contribution.any()
