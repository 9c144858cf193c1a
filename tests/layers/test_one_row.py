"""One-row bf16 matmuls run on ATen's kernels: oneDNN is off exactly while a layer computes a single row in bf16 on
CPU, the flag comes back as it was (nested, concurrent, after an error, when the user had it off), and the outputs
match the oneDNN ones within bf16 rounding."""

import threading

import pytest
import torch
import torch.backends.mkldnn as onednn

from upcycle.layers import FFN, MoE, SoftMoERouter, TopKRouter
from upcycle.layers.experts import Experts
from upcycle.layers.one_row import one_row_kernels, onednn_off


@pytest.fixture(autouse=True)
def onednn_on():
    assert onednn.enabled  # the process default; a test that left it off would show here
    yield
    assert onednn.enabled


@pytest.mark.parametrize(
    ("dtype", "rows", "off"),
    [(torch.bfloat16, 1, True), (torch.bfloat16, 2, False), (torch.float32, 1, False), (torch.float16, 1, False)],
)
def test_off_only_for_one_bf16_row(dtype, rows, off):
    with one_row_kernels(torch.zeros(rows, 4, dtype=dtype), rows):
        assert onednn.enabled is not off


def test_autocast_to_bf16_counts_as_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16), one_row_kernels(torch.zeros(1, 4), 1):
        assert not onednn.enabled


def test_nested_and_after_an_error_the_flag_comes_back():
    x = torch.zeros(1, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"), one_row_kernels(x, 1):
        with one_row_kernels(x, 1):
            assert not onednn.enabled
        assert not onednn.enabled  # the outer holder still holds it
        raise RuntimeError("inside")
    assert onednn.enabled


def test_a_user_who_turned_it_off_keeps_it_off():
    onednn.enabled = False
    try:
        with one_row_kernels(torch.zeros(1, 4, dtype=torch.bfloat16), 1):
            pass
        assert not onednn.enabled
    finally:
        onednn.enabled = True


def test_concurrent_holders_restore_it_once():
    inside, release = threading.Barrier(3), threading.Event()

    def hold():
        with onednn_off():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()  # both threads hold it now
    assert not onednn.enabled
    release.set()
    for thread in threads:
        thread.join()


def _moe(experts: int, top_k: int) -> MoE:
    torch.manual_seed(0)
    router = TopKRouter(48, experts, top_k=top_k, init_std=48**-0.5)
    return MoE(router, Experts(experts, 48, 40, activation="silu", gated=True, bias=False)).to(torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 3])
def test_moe_and_ffn_switch_for_one_token_only(tokens):
    layer, ffn = _moe(8, 2), FFN(48, 40, activation="silu", gated=True).to(torch.bfloat16)
    seen = []
    layer.router.register_forward_pre_hook(lambda *_: seen.append(onednn.enabled))
    ffn.down.register_forward_pre_hook(lambda *_: seen.append(onednn.enabled))
    with torch.inference_mode():
        layer(torch.randn(tokens, 48, dtype=torch.bfloat16))
        ffn(torch.randn(1, tokens, 48, dtype=torch.bfloat16))
    assert seen == [tokens != 1] * 2


def test_one_example_of_many_tokens_is_not_one_row():
    """A slot router's layer computes ``[b, n, d]``: one image (b = 1) of several tokens keeps oneDNN."""
    torch.manual_seed(0)
    layer = MoE(SoftMoERouter(48, 4), Experts(4, 48, 40, activation="silu", gated=True, bias=False))
    layer = layer.to(torch.bfloat16)
    seen = []
    layer.experts.register_forward_pre_hook(lambda *_: seen.append(onednn.enabled))
    with torch.inference_mode():
        layer(torch.randn(1, 5, 48, dtype=torch.bfloat16))
        layer(torch.randn(1, 1, 48, dtype=torch.bfloat16))
    assert seen == [True, False]


@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4)])
def test_one_token_matches_fp32_within_bf16(experts, top_k):
    """The bf16 layer on one token (ATen's kernels) against the same weights in fp32."""
    layer = _moe(experts, top_k)
    x = torch.randn(1, 48).to(torch.bfloat16)
    with torch.inference_mode():
        ours = layer(x).float()
        reference = layer.float()(x.float())
    torch.testing.assert_close(ours, reference, rtol=3e-2, atol=3e-2)
