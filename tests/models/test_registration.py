"""upcycle.models registers upcycle_lm / upcycle_bam with transformers' Auto API through its documented register
calls, without an import hook: importing upcycle imports nothing from transformers; ``register_with_transformers()``
registers, and ``import upcycle`` does it for the Auto modules transformers has already imported."""

import subprocess
import sys

import pytest
import transformers

import upcycle
import upcycle.models
from upcycle.models.lm import UpcycleLMConfig, UpcycleLMForCausalLM, UpcycleLMModel

from .helpers import tiny_lm

UPCYCLE_FIRST = """
import sys
import upcycle
import upcycle.models
assert "transformers" not in sys.modules, "importing upcycle imported transformers"
upcycle.register_with_transformers()
import transformers
"""
TRANSFORMERS_FIRST = """
import sys
import transformers
from transformers import AutoConfig, AutoModelForCausalLM  # the Auto modules load before upcycle
import upcycle
"""
LOAD = """
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(type(model).__name__, type(transformers.AutoConfig.from_pretrained(sys.argv[1])).__name__)
"""


@pytest.mark.parametrize("order", ["upcycle_first", "transformers_first"])
def test_a_fresh_process_loads_a_checkpoint_through_auto_classes(order, tmp_path):
    tiny_lm().save_pretrained(tmp_path)
    code = (UPCYCLE_FIRST if order == "upcycle_first" else TRANSFORMERS_FIRST) + LOAD
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["UpcycleLMForCausalLM", "UpcycleLMConfig"]


def test_registration_is_idempotent():
    upcycle.models.register()
    upcycle.register_with_transformers()
    upcycle.models.register_loaded()
    assert type(transformers.AutoConfig.for_model("upcycle_lm")) is UpcycleLMConfig
    config = UpcycleLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert type(transformers.AutoModelForCausalLM.from_config(config)) is UpcycleLMForCausalLM
    assert type(transformers.AutoModel.from_config(config)) is UpcycleLMModel


def test_lazy_names_and_class_lookup():
    assert upcycle.models.UpcycleLMForCausalLM is UpcycleLMForCausalLM
    assert "UpcycleLMConfig" in dir(upcycle.models)
    assert upcycle.models.get_model_class("UpcycleLMModel") is UpcycleLMModel
    assert upcycle.models.get_model_class("LlamaForCausalLM") is None
    with pytest.raises(AttributeError):
        upcycle.models.NoSuchModel  # noqa: B018
