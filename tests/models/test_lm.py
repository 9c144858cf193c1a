"""UpcycleLM: config checks, Hugging Face round trips, KV cache and generate, padding, loss, equality with
transformers' Llama, and a tiny training run."""

import time

import pytest
import torch
import torch.nn.functional as F
import transformers

from upcycle.models.lm import UpcycleLMConfig, UpcycleLMForCausalLM, UpcycleLMModel

from .helpers import BLOCKS, byte_ids, tiny_config, tiny_lm


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_defaults_and_derived_fields():
    config = UpcycleLMConfig()
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (259, 256, 257, 258)
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.parallel_attention is False and config.hidden_act == "silu"
    assert UpcycleLMConfig(hidden_size=48, num_attention_heads=4, head_dim=16).head_dim == 16  # explicit head_dim


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "not divisible by num_attention_heads.*set head_dim"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads.*divisors of 4"),
        ({"hidden_size": 36, "num_attention_heads": 4}, "head_dim must be even"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
    ],
)
def test_config_rejects_inconsistent_shapes(overrides, message):
    with pytest.raises(ValueError, match=message):
        UpcycleLMConfig(**overrides)


def test_parallel_blocks_have_one_norm():
    sequential, parallel = tiny_lm(False), tiny_lm(True)
    assert hasattr(sequential.model.layers[0], "post_attention_layernorm")
    assert not hasattr(parallel.model.layers[0], "post_attention_layernorm")
    # the parallel model is the sequential one minus one d-vector per block
    count = sum(p.numel() for p in sequential.parameters()) - sum(p.numel() for p in parallel.parameters())
    assert count == sequential.config.num_hidden_layers * sequential.config.hidden_size


# --- Hugging Face round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_then_auto_from_pretrained(block, tied, tmp_path):
    model = tiny_lm(BLOCKS[block], tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is UpcycleLMForCausalLM and loaded.config.parallel_attention is BLOCKS[block]
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)) is UpcycleLMConfig
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert max_diff(loaded.eval()(ids).logits, model(ids).logits) == 0.0
    base = transformers.AutoModel.from_pretrained(tmp_path)  # the decoder alone, from the same checkpoint
    assert type(base) is UpcycleLMModel
    with torch.no_grad():
        assert max_diff(base.eval()(ids).last_hidden_state, model.model(ids).last_hidden_state) == 0.0


def test_return_dict_false_gives_a_tuple():
    model = tiny_lm()
    ids = torch.randint(0, 256, (1, 5))
    loss, logits, _cache = model(ids, labels=ids, return_dict=False)
    assert logits.shape == (1, 5, 259) and loss.ndim == 0


# --- KV cache and generate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, multi-head
def test_cache_gives_the_logits_of_a_full_recompute(block, kv_heads):
    model = tiny_lm(BLOCKS[block], num_key_value_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        full = model(ids).logits  # (b, 14, V)
        out = model(ids[:, :8], use_cache=True)  # prefill 8 tokens
        steps = [out.logits]
        cache = out.past_key_values
        out = model(ids[:, 8:11], past_key_values=cache, use_cache=True)  # a chunk of 3 against the cache
        steps.append(out.logits)
        for i in range(11, 14):  # then one token at a time
            out = model(ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert cache.get_seq_length() == 14
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_generate_with_and_without_cache_agree(block, kv_heads):
    model = tiny_lm(BLOCKS[block], num_key_value_heads=kv_heads)
    prompt = torch.randint(0, 256, (2, 6))
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)
    # and greedy decoding by hand (argmax of a full forward each step) agrees with both
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = model(tokens).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")  # what min_new_tokens does
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, cached)


# --- padding --------------------------------------------------------------------------------------------------------


def left_pad(sequences: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(s.shape[1] for s in sequences)
    ids = torch.full((len(sequences), length), pad)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, length - s.shape[1] :] = s[0]
        mask[row, length - s.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("block", BLOCKS)
def test_left_padded_batch_matches_single_sequences(block):
    model = tiny_lm(BLOCKS[block])
    sequences = byte_ids("upcycle", "a dense model", "MoE")
    ids, mask = left_pad(sequences, model.config.pad_token_id)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits[:, -1]  # (3, V)
        singles = torch.cat([model(s).logits[:, -1] for s in sequences])
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()  # padding queries too (they see themselves)
    assert max_diff(batched, singles) <= 1e-5


@pytest.mark.parametrize("block", BLOCKS)
def test_left_padded_generate_matches_single_sequences(block):
    model = tiny_lm(BLOCKS[block])
    sequences = byte_ids("upcycle", "a dense model")
    ids, mask = left_pad(sequences, model.config.pad_token_id)
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    batched = model.generate(ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
    singles = torch.cat([model.generate(s, **settings)[:, s.shape[1] :] for s in sequences])
    assert torch.equal(batched, singles)


def test_attention_mask_must_cover_the_cached_tokens():
    model = tiny_lm()
    ids = torch.randint(0, 256, (1, 6))
    cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="6 cached \\+ 1 new"):
        model(ids[:, :1], attention_mask=torch.ones(1, 1), past_key_values=cache)


# --- loss -----------------------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_lm()
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt that should not be learned
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1]  # position i predicts token i + 1
    targets = labels[:, 1:]
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert abs(out.loss.item() - manual.item()) <= 1e-6


# --- equality with transformers' Llama ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 2},
        {"num_key_value_heads": 1, "rope_theta": 500.0},
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
        {"hidden_size": 48, "num_attention_heads": 4, "head_dim": 16},  # h·hd != d
    ],
)
def test_sequential_model_equals_llama_with_the_same_weights(overrides):
    ours = tiny_lm(False, **overrides)
    c = ours.config
    llama_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)}, rms_norm_eps=c.rms_norm_eps,
        hidden_act=c.hidden_act, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="eager",  # an independent attention path
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, llama(ids).logits) <= 1e-5
    prompt = ids[:, :5]
    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}
    assert torch.equal(ours.generate(prompt, **settings), llama.generate(prompt, **settings))


# --- training -------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine OpenMP threads waiting for a core make each one
    50x slower (measured: 15 ms instead of 0.3 ms on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", BLOCKS)
def test_a_few_adamw_steps_make_the_loss_fall(block, one_thread):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = UpcycleLMForCausalLM(tiny_config(BLOCKS[block])).train()
    data = torch.tensor(list(b"the cat sat on the mat. " * 8))  # a repeated byte string
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])  # (8, 33)
        out = model(batch, labels=batch)
        assert out.past_key_values is None  # training forwards build no cache
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] > 5.0  # ~ln(259): the untrained model guesses uniformly
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert time.perf_counter() - start < 5.0
