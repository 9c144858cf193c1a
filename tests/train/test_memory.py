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


def test_mallopt_passes_the_parameter_and_value_to_glibc(monkeypatch):
    """What glibc then does is its own: whether a block is mapped also depends on the free chunks a long-running
    process holds, so the call itself is what is checked."""
    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: Libc())
    memory._mallopt(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES)
    memory._mallopt(memory.M_MMAP_THRESHOLD, memory.GLIBC_MAX_DYNAMIC_THRESHOLD)
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES),
                     (memory.M_MMAP_THRESHOLD, memory.GLIBC_MAX_DYNAMIC_THRESHOLD)]  # fmt: skip


@pytest.mark.parametrize("library", [None, object()], ids=["no_libc", "no_mallopt"])
def test_mallopt_is_a_no_op_without_glibc(monkeypatch, library):
    def load(name):
        if library is None:
            raise OSError(f"{name}: cannot open shared object file")
        return library

    monkeypatch.setattr(memory.ctypes, "CDLL", load)
    assert memory._mallopt(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES) is None


@pytest.mark.parametrize(("found", "opened"), [("libc.so.7", "libc.so.7"), (None, "libc.so.6")],
                         ids=["found", "not_found"])  # fmt: skip
def test_mallopt_opens_the_c_library_find_library_names_else_libc_so_6(monkeypatch, found, opened):
    """find_library needs ldconfig or a compiler, which a slim container may lack: then glibc's soname is tried."""
    names = []

    class Libc:
        def mallopt(self, parameter, value):
            return 1

    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: found if name == "c" else None)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: names.append(name) or Libc())
    memory._mallopt(memory.M_MMAP_THRESHOLD, memory.MAPPED_BLOCK_BYTES)
    assert names == [opened]
