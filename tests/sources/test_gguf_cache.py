"""The GGUF cache finds a file by its content: a moved copy is found again, an edited one converted again."""


def test_the_gguf_cache_is_keyed_by_content_not_path(tmp_path):
    from upcycle.sources import content_key

    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(range(256)) * 1000)
    moved = tmp_path / "b" / "renamed.gguf"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    assert content_key(first) == content_key(moved) == content_key(first, chunk=100)  # chunking changes nothing
    moved.write_bytes(first.read_bytes()[:-1] + b"\x00")
    assert content_key(moved) != content_key(first)
