"""Greedy generation with the KV cache equals generation without it, for every language-model class upcycle ships
(its own LM, sequential and parallel; the BAM mixture) and every format it exports, reloaded by transformers.

A model that ignores the cache transformers passes (the name changed from ``past_key_values`` to ``cache`` in 5.x)
sees only the newest token at each cached step and drifts from the uncached continuation, which these tests catch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import upcycle

from ..export.helpers import converted, tiny_llama
from .helpers import tiny_lm

NEW_TOKENS = 8


def greedy(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0)


def assert_cache_changes_nothing(model, vocab: int) -> None:
    torch.manual_seed(0)
    prompt = torch.randint(3, vocab, (2, 5))
    with torch.no_grad():
        cached, uncached = greedy(model, prompt, True), greedy(model, prompt, False)
    assert cached.shape == (2, 5 + NEW_TOKENS)
    assert torch.equal(cached, uncached), (cached, uncached)


def bam(parallel: bool, shared_kv: bool):
    models = [tiny_lm(parallel=parallel, seed=s) for s in range(3)]
    return upcycle.merge(models, method="bam", shared_kv=shared_kv, router_init_std=0.5).eval()


SHIPPED = {
    "upcycle_lm sequential": lambda: tiny_lm(),
    "upcycle_lm parallel": lambda: tiny_lm(parallel=True),
    "bam expert kv": lambda: bam(parallel=True, shared_kv=False),
    "bam shared kv": lambda: bam(parallel=False, shared_kv=True),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_classes(name):
    model = SHIPPED[name]()
    assert_cache_changes_nothing(model, model.config.vocab_size)


EXPORTS = {
    "mixtral": lambda: converted(),
    "qwen2_moe": lambda: converted(),
    "bam": lambda: bam(parallel=True, shared_kv=False),
}


@pytest.mark.parametrize("format", list(EXPORTS))
def test_exports_reloaded_by_transformers(format, tmp_path):
    upcycle.export(EXPORTS[format](), tmp_path / format, format=format)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / format).eval()
    assert_cache_changes_nothing(loaded, loaded.config.vocab_size)


def test_cache_under_either_name_gives_the_same_logits():
    """Both names reach the cache: a second forward over one more token, given the first's cache, equals a full
    forward over all the tokens."""
    model = tiny_lm()
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            first = model(ids[:, :-1], use_cache=True)
            cache = first.cache if hasattr(first, "cache") else first.past_key_values
            step = model(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)


def test_dense_llama_twin_for_reference():
    """The check itself: transformers' own Llama passes it, so a failure above is ours, not the test's."""
    model = tiny_llama()
    assert_cache_changes_nothing(model, model.config.vocab_size)
