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


def test_mallopt_sets_glibcs_mmap_threshold():
    """Observed through glibc's own counter of mmapped blocks: a block at or above the threshold gets a mapping."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mapped(size):
        before = libc.mallinfo2().hblks
        block = libc.malloc(size)
        try:
            return libc.mallinfo2().hblks - before
        finally:
            libc.free(block)

    block = 2 * memory.MAPPED_BLOCK_BYTES  # 8 MB: below glibc's top threshold, above the training setting
    try:
        memory._mallopt(memory.M_MMAP_THRESHOLD, memory.GLIBC_MAX_DYNAMIC_THRESHOLD)
        assert mapped(block) == 0
        memory._mallopt(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES)
        assert mapped(block) == 1
    finally:  # where training leaves it
        memory._mallopt(memory.M_MMAP_THRESHOLD, memory.GLIBC_MAX_DYNAMIC_THRESHOLD)


@pytest.mark.parametrize("library", [None, object()], ids=["no_libc", "no_mallopt"])
def test_mallopt_is_a_no_op_without_glibc(monkeypatch, library):
    def load(name):
        if library is None:
            raise OSError(f"{name}: cannot open shared object file")
        return library

    monkeypatch.setattr(memory.ctypes, "CDLL", load)
    assert memory._mallopt(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES) is None
