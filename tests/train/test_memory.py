"""The training loop's allocator setting: only models of ≥ 1 GB of parameters change it, and it is restored."""

import pytest
from torch import nn

from upcycle.train import memory


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "_mallopt", lambda parameter, value: seen.append((parameter, value)))
    return seen


def test_small_models_leave_the_allocator_alone(calls):
    with memory.large_blocks_mapped(nn.Linear(64, 64)):
        pass
    assert calls == []


def test_large_models_map_large_blocks_and_restore_even_on_error(calls):
    large = nn.Linear(1 << 14, 1 << 14, bias=False, device="meta")  # 2^28 fp32 = 1 GB, never allocated
    with pytest.raises(RuntimeError), memory.large_blocks_mapped(large):
        assert calls == [(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES)]
        raise RuntimeError("interrupted")
    assert calls[-1] == (memory.M_MMAP_THRESHOLD, memory.GLIBC_MAX_DYNAMIC_THRESHOLD)
