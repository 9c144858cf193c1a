"""The direct-I/O safetensors writer of streaming conversion writes files that safetensors reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from upcycle.stream.direct_io import ALIGN, CHUNK, save_file


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(CHUNK // 4 + 1000, generator=generator),  # more than one buffer, not a block multiple
        "bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "half": torch.randn(7, generator=generator).half(),
        "ints": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(6, 8, generator=generator)[:, ::2],  # not contiguous: its values, not its storage
    }


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_written_file_reads_back_exactly(tmp_path, monkeypatch, direct):
    import upcycle.stream.direct_io as direct_io

    original, calls = direct_io._write_direct, []

    def recording(*args):
        original(*args)  # raises where the file system refuses direct I/O: then the buffered path writes
        calls.append(args[0])

    monkeypatch.setattr(direct_io, "_write_direct", recording)
    tensors = _tensors()
    path = tmp_path / "shard.safetensors"
    save_file(tensors, path, metadata={"format": "pt"}, direct=direct)
    assert len(calls) == direct  # this file system takes direct I/O: the direct path wrote the file
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % ALIGN == 0 and path.stat().st_size == 8 + header + data  # aligned data, no trailing bytes


def test_an_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
