"""``all_finite``: the fast NaN / Inf test every saved, exported and streamed tensor goes through."""

import pytest
import torch

from upcycle.errors import all_finite, first_non_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("size", [1, 7, 100_003])
def test_one_bad_value_anywhere_is_found(dtype, bad, size):
    for position in {0, size // 2, size - 1}:
        tensor = torch.randn(size).to(dtype)
        assert all_finite(tensor)
        tensor[position] = bad
        assert not all_finite(tensor)


def test_empty_and_strided_tensors():
    assert all_finite(torch.empty(0, 3))
    strided = torch.randn(4, 6)[:, ::2]
    strided[1, 1] = float("nan")
    assert not all_finite(strided)
    assert first_non_finite([("ok", torch.ones(2)), ("bad", strided), ("ints", torch.arange(3))]) == ["bad"]
