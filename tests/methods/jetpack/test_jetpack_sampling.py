"""MoE Jetpack recycling primitives (arXiv 2406.04801 §3.1): index sets are well formed and differ between experts,
importance sampling follows the importance, METIS parts recover planted co-activation blocks, slicing equals
manual indexing and a full-width expert reproduces the dense FFN."""

import pytest
import torch

from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.methods.jetpack.sampling import (
    channel_selection,
    graph_partition_sampling,
    importance_sampling,
    random_sampling,
    slice_expert_weights,
    uniform_selection,
)
from upcycle.methods.sparse_upcycling.recycling import experts_for


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planted_blocks(blocks: int = 8, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-activation counts of ``blocks`` groups of units that fire together, shuffled, plus sub-threshold noise."""
    total = blocks * size
    group = torch.randperm(total, generator=gen(5)) % blocks  # unit -> planted block
    counts = torch.randint(0, 5, (total, total), generator=gen(6)).double()
    counts = counts + counts.T + 100.0 * (group[:, None] == group[None, :])
    return counts, group


STRATEGIES = {
    "importance": lambda H, e, h: importance_sampling(torch.rand(H, generator=gen(1)), e, h, gen()),
    "graph": lambda H, e, h: graph_partition_sampling(planted_blocks()[0], e, h, gen(), parts=8, threshold=20),
    "uniform": lambda H, e, h: uniform_selection(H, e, h),
    "random": lambda H, e, h: random_sampling(H, e, h, gen()),
}


def assert_well_formed(index: torch.Tensor, total: int, experts: int, h: int) -> None:
    assert index.shape == (experts, h) and index.dtype == torch.long
    assert (index.diff(dim=1) > 0).all()  # sorted ascending, hence unique within an expert
    assert index.min() >= 0 and index.max() < total
    assert len({tuple(row) for row in index.tolist()}) == experts  # experts differ


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("h", [1, 12, 40, 63])
def test_index_sets_are_well_formed(strategy, h):
    experts = 2 if h == 63 and strategy == "uniform" else 6  # 63 of 64 evenly spaced: only a few offsets exist
    assert_well_formed(STRATEGIES[strategy](64, experts, h), 64, experts, h)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_width_experts_cannot_differ(strategy):
    with pytest.raises(ValueError, match=r"cannot differ|distinct"):
        STRATEGIES[strategy](64, 2, 64)
    assert STRATEGIES[strategy](64, 1, 64).equal(torch.arange(64)[None])  # one expert may take every unit


def test_the_same_generator_seed_gives_the_same_sets():
    importance = torch.rand(64, generator=gen(1))
    assert importance_sampling(importance, 4, 16, gen(3)).equal(importance_sampling(importance, 4, 16, gen(3)))
    counts = planted_blocks()[0]
    a = graph_partition_sampling(counts, 4, 16, gen(3), parts=8, threshold=20)
    assert a.equal(graph_partition_sampling(counts, 4, 16, gen(3), parts=8, threshold=20))


def test_importance_sampling_keeps_the_important_units_in_nearly_every_expert():
    importance = torch.full((64,), 1e-3)
    heavy = torch.tensor([3, 10, 17, 30, 41, 50, 58, 63])
    importance[heavy] = 100.0
    index = importance_sampling(importance, 16, 16, gen())
    contains = (index.unsqueeze(-1) == heavy).any(dim=1)  # [e, 8]: heavy unit k is in expert i
    assert contains.float().mean() >= 0.95


def test_importance_sampling_frequency_follows_importance():
    importance = torch.linspace(0.01, 1.0, 64)
    index = importance_sampling(importance, 200, 16, gen())
    frequency = torch.bincount(index.flatten(), minlength=64).float()
    assert frequency[48:].mean() > 2 * frequency[:16].mean()


def test_zero_importance_units_only_fill_in_when_too_few_are_positive():
    importance = torch.zeros(64)
    importance[::2] = torch.rand(32, generator=gen(2)) + 0.1  # 32 positive units
    index = importance_sampling(importance, 8, 20, gen())
    assert (importance[index] > 0).all()
    index = importance_sampling(importance, 8, 40, gen())  # 40 > 32 positive: all of them + 8 zero units
    assert all(set(range(0, 64, 2)) <= set(row) for row in index.tolist())
    with pytest.raises(ValueError, match="cannot differ"):
        importance_sampling(importance, 2, 32, gen())  # 32 positive units give a single 32-set


def test_channel_selection_shared_sampled_identity():
    importance = torch.rand(48, generator=gen(4))
    top = importance.topk(32).indices.sort().values
    shared = channel_selection(importance, 32, 4, "shared")
    assert shared.shape == (4, 32) and (shared == top).all()
    importance[::3] = 0
    sampled = channel_selection(importance, 24, 4, "sampled", gen())
    assert sampled.shape == (4, 24) and (sampled.diff(dim=1) > 0).all()
    assert (importance[sampled] > 0).all() and len({tuple(r) for r in sampled.tolist()}) > 1
    assert channel_selection(importance, 48, 3, "sampled", gen()).equal(torch.arange(48).expand(3, 48))
    with pytest.raises(ValueError, match="'shared' or 'sampled'"):
        channel_selection(importance, 24, 4, "top")


@pytest.mark.parametrize("weighted", [False, True])
def test_graph_partition_recovers_planted_blocks(weighted):
    counts, group = planted_blocks()
    index = graph_partition_sampling(counts, 6, 16, gen(), parts=8, threshold=20, weighted=weighted)
    assert_well_formed(index, 64, 6, 16)
    for row in index:
        blocks = group[row].unique()
        assert len(blocks) == 2 and (group == blocks[0]).sum() + (group == blocks[1]).sum() == 16  # 2 whole blocks


def test_graph_partition_overshooting_part_fills_exactly_h():
    counts, group = planted_blocks()
    index = graph_partition_sampling(counts, 4, 20, gen(), parts=8, threshold=20)  # 2 blocks + 4 units of a third
    assert_well_formed(index, 64, 4, 20)
    for row in index:
        sizes = torch.bincount(group[row], minlength=8)
        assert sorted(sizes.tolist())[-3:] == [4, 8, 8]


def test_graph_partition_handles_isolated_units_and_empty_graphs():
    counts = torch.zeros(40, 40)
    assert_well_formed(graph_partition_sampling(counts, 4, 10, gen(), parts=8), 40, 4, 10)  # no edges at all
    counts[:8, :8] = 50  # one clique, 32 isolated units
    assert_well_formed(graph_partition_sampling(counts, 4, 10, gen(), parts=8), 40, 4, 10)
    assert_well_formed(graph_partition_sampling(counts, 3, 10, gen(), parts=1000), 40, 3, 10)  # parts > H


def test_uniform_selection_offsets():
    index = uniform_selection(64, 4, 16)  # spacing 4: expert i starts at unit i
    assert index[0].equal(torch.arange(0, 64, 4))
    for i in range(4):
        assert index[i].equal(torch.arange(0, 64, 4) + i)
    assert uniform_selection(64, 2, 32)[1].equal(torch.arange(1, 64, 2))
    with pytest.warns(UserWarning, match="only 2 distinct offsets"):
        index = uniform_selection(64, 4, 32)  # spacing 2: only two evenly spaced sets exist
    assert {tuple(row) for row in index.tolist()} == {tuple(range(0, 64, 2)), tuple(range(1, 64, 2))}


@pytest.mark.parametrize(
    "call",
    [
        lambda: random_sampling(16, 2, 17, gen()),  # h > H
        lambda: importance_sampling(torch.ones(16), 0, 4, gen()),  # no experts
        lambda: importance_sampling(torch.ones(4, 4), 2, 2, gen()),  # importance not a vector
        lambda: importance_sampling(-torch.ones(16), 2, 2, gen()),
        lambda: channel_selection(torch.ones(16), 17, 2),  # d > d_src
        lambda: graph_partition_sampling(torch.ones(4, 5), 2, 2, gen()),  # not square
    ],
)
def test_bad_arguments_raise_value_errors(call):
    with pytest.raises(ValueError):
        call()


def dense_ffn(gated: bool, norm: bool, d: int = 12, h: int = 20) -> DenseFFN:
    g = gen(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return DenseFFN(
        r(h, d), r(d, h), "silu" if gated else "gelu", r(h), r(h, d) if gated else None, r(h) if gated else None,
        r(d), (r(h), r(h), 1e-5) if norm else None,
    )  # fmt: skip


@pytest.mark.parametrize(("gated", "norm"), [(False, False), (True, True)])
def test_slicing_equals_manual_indexing(gated, norm):
    dense = dense_ffn(gated, norm)
    hidden = importance_sampling(torch.rand(20, generator=gen(8)), 3, 8, gen())
    channels = channel_selection(torch.rand(12, generator=gen(9)), 10, 3, "sampled", gen())
    sliced = slice_expert_weights(dense, hidden, channels)
    layout = {name: p.shape for name, p in experts_for(dense, 3, 8).named_parameters()}
    assert {name: t.shape for name, t in slice_expert_weights(dense, hidden).items()} == layout  # Experts' layout
    for i, (units, kept) in enumerate(zip(hidden, channels, strict=True)):
        assert sliced["w_up"][i].equal(dense.w_up[units][:, kept])
        assert sliced["w_down"][i].equal(dense.w_down[kept][:, units])
        assert sliced["b_up"][i].equal(dense.b_up[units])
        assert sliced["b_down"][i].equal(dense.b_down[kept])
        if gated:
            assert sliced["w_gate"][i].equal(dense.w_gate[units][:, kept])
            assert sliced["b_gate"][i].equal(dense.b_gate[units])
        if norm:
            assert sliced["norm_weight"][i].equal(dense.hidden_norm[0][units])
            assert sliced["norm_bias"][i].equal(dense.hidden_norm[1][units])
    assert sliced["w_up"].shape == (3, 8, 10) and sliced["w_down"].shape == (3, 10, 8)


@pytest.mark.parametrize(("gated", "norm"), [(False, False), (True, True)])
def test_full_width_expert_reproduces_the_dense_ffn(gated, norm):
    dense = dense_ffn(gated, norm)
    sliced = slice_expert_weights(dense, torch.arange(20)[None], channel_selection(torch.rand(12), 12, 1))
    expert = {name: tensor[0] for name, tensor in sliced.items()}
    norm_params = (expert.pop("norm_weight"), expert.pop("norm_bias"), 1e-5) if norm else None
    x = torch.randn(5, 12, generator=gen(10))
    assert DenseFFN(activation=dense.activation, hidden_norm=norm_params, **expert).forward(x).equal(dense.forward(x))


def test_slicing_rejects_bad_indices():
    dense = dense_ffn(False, False)
    with pytest.raises(ValueError, match="outside"):
        slice_expert_weights(dense, torch.tensor([[0, 20]]))
    with pytest.raises(ValueError, match="repeats"):
        slice_expert_weights(dense, torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="experts"):
        slice_expert_weights(dense, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        slice_expert_weights(dense, torch.tensor([[0, 1]]), torch.arange(13)[None])  # d > d_src


def test_uniform_selection_warns_only_when_experts_share_sets():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uniform_selection(64, 4, 16)  # four distinct offsets for four experts: nothing to warn about


@pytest.fixture
def metis_calls(monkeypatch) -> list[tuple[int, dict]]:
    """Each METIS call's part count and keyword arguments, the call itself going through."""
    import pymetis

    calls, part_graph = [], pymetis.part_graph

    def spy(parts, **kwargs):
        calls.append((parts, kwargs))
        return part_graph(parts, **kwargs)

    monkeypatch.setattr(pymetis, "part_graph", spy)
    return calls


def test_weighted_graph_partition_passes_bounded_integer_edge_weights(metis_calls):
    """Edge weights are the counts rescaled to integers 1..1000 (METIS sums them in 32 bits); the cut follows them."""
    counts = torch.ones(8, 8)  # a complete graph: unweighted, every balanced cut costs the same
    counts[:4, :4] = counts[4:, 4:] = 100.0  # heavy edges inside two cliques
    for seed in range(4):
        groups = graph_partition_sampling(counts, 2, 4, gen(seed), parts=2, weighted=True)
        assert sorted(sorted(row.tolist()) for row in groups) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    weights = torch.tensor(metis_calls[-1][1]["eweights"])
    assert weights.numel() == 8 * 7 and weights.min() == 11 and weights.max() == 1000  # 1 + round(999 * w / max)
    graph_partition_sampling(counts, 2, 4, gen(), parts=2)
    assert metis_calls[-1][1]["eweights"] is None  # unweighted, like the released code


def test_graph_partition_draws_only_from_its_generator():
    """The overshooting part's subset comes from the given generator: the global RNG does not change the result."""
    counts, _ = planted_blocks()
    torch.manual_seed(0)
    first = graph_partition_sampling(counts, 4, 20, gen(3), parts=8, threshold=20)
    torch.manual_seed(1)
    assert torch.equal(graph_partition_sampling(counts, 4, 20, gen(3), parts=8, threshold=20), first)


def test_zero_importance_fill_is_distinct_zero_units_from_the_generator():
    importance = torch.zeros(64)
    importance[::2] = 1.0  # 32 positive units
    torch.manual_seed(0)
    index = importance_sampling(importance, 4, 40, gen(7))
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(importance_sampling(importance, 4, 40, gen(7)), index)
    for row in index:
        assert row.unique().numel() == 40 and (importance[row] == 0).sum() == 8


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ([0, 1], "integer tensor"),  # not a tensor
        (torch.tensor([0, 1]), "integer tensor"),  # 1-D
        (torch.tensor([[0.0, 1.0]]), "integer tensor"),  # float
        (torch.tensor([[True, False]]), "integer tensor"),  # bool masks are not index sets
        (torch.zeros(0, 2, dtype=torch.long), "at least one expert"),
        (torch.zeros(1, 0, dtype=torch.long), "at least one expert"),
        (torch.arange(21)[None], "at least one expert"),  # more units than the 20 there are
        (torch.tensor([[-1, 2]]), "outside 0..19"),
        (torch.tensor([[0, 20]]), "outside 0..19"),
    ],
)
def test_index_sets_are_checked(index, match):
    with pytest.raises(ValueError, match=match):
        slice_expert_weights(dense_ffn(False, False), index)


def test_one_unit_experts_and_the_edge_indices_are_valid():
    dense = dense_ffn(False, False)
    weights = slice_expert_weights(dense, torch.tensor([[0], [19]], dtype=torch.int32))
    assert weights["w_up"].shape == (2, 1, 12) and torch.equal(weights["w_up"][1, 0], dense.w_up[19])
    assert slice_expert_weights(dense, torch.arange(20)[None])["w_up"].shape == (1, 20, 12)  # h = H: the whole FFN


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("what", ["importance", "channel importance"])
def test_importance_must_be_finite_and_non_negative(bad, what):
    importance = torch.ones(16)
    importance[3] = bad
    with pytest.raises(ValueError, match=f"^{what} must be finite and non-negative"):
        if what == "importance":
            importance_sampling(importance, 2, 4, gen())
        else:
            channel_selection(importance, 8, 2, "sampled", gen())


SIZE_MESSAGE = r"^cannot take 17 hidden units per expert out of 16; choose 1 <= size <= 16$"


@pytest.mark.parametrize(
    "call",
    [
        lambda: importance_sampling(torch.ones(16), 2, 17, gen()),
        lambda: graph_partition_sampling(torch.ones(16, 16), 2, 17, gen()),
        lambda: uniform_selection(16, 2, 17),
        lambda: random_sampling(16, 2, 17, gen()),
    ],
)
def test_every_strategy_names_the_hidden_units_it_cannot_take(call):
    with pytest.raises(ValueError, match=SIZE_MESSAGE):
        call()


@pytest.mark.parametrize(
    ("call", "detail"),
    [
        (lambda: importance_sampling(torch.ones(16), 2, 16, gen()), "16 of 16 units with 16 of positive importance"),
        (lambda: graph_partition_sampling(torch.ones(16, 16), 2, 16, gen()), "16 of 16 units"),
        (lambda: uniform_selection(16, 2, 16), "evenly spaced sets of 16 of 16 units"),
        (lambda: random_sampling(16, 2, 16, gen()), "16 of 16 units"),
    ],
)
def test_experts_that_cannot_differ_are_refused_with_the_reason(call, detail):
    with pytest.raises(ValueError, match=r"^num_experts must be >= 1, got 0$"):
        random_sampling(16, 0, 4, gen())
    with pytest.raises(ValueError) as refused:
        call()
    assert str(refused.value) == (
        f"2 experts cannot differ: {detail} allow only 1 distinct set(s); use fewer experts or a smaller expert "
        "hidden size"
    )


def test_draws_that_keep_repeating_an_expert_are_refused_after_max_attempts(monkeypatch):
    concentrated = torch.tensor([1.0, 1.0, 1e-12, 1e-12])  # six pairs exist, one is drawn (almost) always
    with pytest.raises(ValueError) as refused:
        importance_sampling(concentrated, 3, 2, gen(), max_attempts=5)
    assert str(refused.value) == ("expert 1 repeated an earlier expert in 5 draws (the importance is concentrated on "
                                  "too few units); use fewer experts")  # fmt: skip
    # two METIS parts of two units: whole parts make only two distinct experts of 2 units, six pairs exist
    counts = torch.zeros(4, 4)
    counts[:2, :2] = counts[2:, 2:] = 9.0
    with pytest.raises(ValueError) as refused:
        graph_partition_sampling(counts, 3, 2, gen(), parts=2)
    assert str(refused.value) == ("expert 2 repeated an earlier expert in 1000 draws (the partition leaves too few "
                                  "distinct unions of parts); use fewer experts")  # fmt: skip
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.arange(n))  # every draw the same subset
    with pytest.raises(ValueError) as refused:
        random_sampling(8, 2, 4, gen())
    assert str(refused.value) == "expert 1 repeated an earlier expert in 1000 draws (too few distinct subsets); " \
                                 "use fewer experts"  # fmt: skip


def test_random_sampling_draws_only_from_its_generator():
    torch.manual_seed(0)
    first = random_sampling(64, 4, 16, gen(3))
    torch.manual_seed(1)
    assert torch.equal(random_sampling(64, 4, 16, gen(3)), first)


def test_the_zero_importance_fill_is_uniform_over_the_zero_units():
    """With fewer positive units than h, the rest is a uniform draw among the zero units, not the last of them."""
    importance = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    fills = [importance_sampling(importance, 1, 3, gen(seed))[0, 2].item() for seed in range(200)]
    assert {unit: fills.count(unit) for unit in range(2, 6)} == pytest.approx(dict.fromkeys(range(2, 6), 50), abs=20)
    index = importance_sampling(importance, 4, 3, gen())  # four zero units: four distinct experts exist
    assert sorted(row[2].item() for row in index) == [2, 3, 4, 5] and (index[:, :2] == torch.tensor([0, 1])).all()
    channels = [channel_selection(importance, 3, 1, "sampled", gen(seed))[0, 2].item() for seed in range(200)]
    assert set(channels) == {2, 3, 4, 5}


def test_graph_partition_takes_parts_from_1_and_32_by_default(metis_calls):
    counts, _ = planted_blocks()
    graph_partition_sampling(counts, 2, 8, gen())
    assert [parts for parts, _ in metis_calls] == [32]  # the released code's 32 parts
    assert_well_formed(graph_partition_sampling(counts, 3, 8, gen(), parts=1), 64, 3, 8)  # one part: random subsets
    assert len(metis_calls) == 1  # a single part needs no METIS
    with pytest.raises(ValueError, match=r"^parts must be >= 1, got 0$"):
        graph_partition_sampling(counts, 2, 8, gen(), parts=0)


def test_metis_is_seeded_from_the_generator_and_skipped_on_a_graph_without_edges(metis_calls):
    counts, _ = planted_blocks()
    for seed in range(3):
        graph_partition_sampling(counts, 2, 8, gen(seed), parts=8, threshold=20)
    # METIS's seed is the generator's first draw, a non-negative 32-bit signed integer
    assert [kwargs["options"].seed for _, kwargs in metis_calls] == [
        int(torch.randint(2**31 - 1, (1,), generator=gen(seed))) for seed in range(3)
    ]
    empty = torch.zeros(16, 16)
    torch.manual_seed(0)
    first = graph_partition_sampling(empty, 4, 4, gen(3), parts=4)
    torch.manual_seed(1)  # the random balanced partition comes from the generator too
    assert torch.equal(graph_partition_sampling(empty, 4, 4, gen(3), parts=4), first)
    assert len(metis_calls) == 3  # no edges: no METIS call


def test_single_unit_parts_are_drawn_like_any_other(monkeypatch):
    import pymetis

    membership = [0, 0, 0, 0, 1, 2, 3, 3]  # parts 1 and 2 hold one unit each
    monkeypatch.setattr(pymetis, "part_graph", lambda parts, **kwargs: (0, membership))
    counts = torch.ones(8, 8)
    index = graph_partition_sampling(counts, 20, 2, gen(), parts=4)
    assert {4, 5} <= set(index.flatten().tolist())  # the single units reach experts
    assert_well_formed(index, 8, 20, 2)


def test_coactivation_counts_of_any_dtype_give_the_same_sets():
    counts, _ = planted_blocks()
    counts = counts.clamp(max=255)
    reference = graph_partition_sampling(counts, 4, 16, gen(), parts=8, threshold=20, weighted=True)
    small = counts.to(torch.uint8)  # integer counts: 999 * count must not overflow the input's dtype
    assert torch.equal(graph_partition_sampling(small, 4, 16, gen(), parts=8, threshold=20, weighted=True), reference)


def test_graph_partition_without_pymetis_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pymetis", None)
    counts, _ = planted_blocks()
    with pytest.raises(ImportError) as refused:
        graph_partition_sampling(counts, 2, 8, gen(), parts=8, threshold=20)
    assert str(refused.value) == ("graph-partition sampling (METIS) needs 'pymetis', which is not installed: "
                                  "pip install 'upcycle[metis]'")  # fmt: skip


def test_uniform_selection_warning_in_full_points_outside_the_library():
    from upcycle.methods.jetpack import sampling

    with pytest.warns(UserWarning) as record:
        uniform_selection(64, 4, 32)
    assert str(record[0].message) == ("uniform selection: evenly spaced sets of 32 of 64 units (spacing 2.00) have "
                                      "only 2 distinct offsets for 4 experts, so experts share sets")  # fmt: skip
    assert record[0].filename != sampling.__file__  # it points at a caller's line, not the library's


def test_shape_and_generator_refusals_in_full_and_integer_importance_counts():
    with pytest.raises(ValueError, match=r"^importance must be a vector \[H\], got shape \(4, 4\)$"):
        importance_sampling(torch.ones(4, 4), 2, 2, gen())
    with pytest.raises(ValueError, match=r"^coactivation must be a square \[H, H\] matrix, got shape \(4, 5\)$"):
        graph_partition_sampling(torch.ones(4, 5), 2, 2, gen())
    with pytest.raises(ValueError, match=r"^cannot take 17 channels per expert out of 16; choose 1 <= size <= 16$"):
        channel_selection(torch.ones(16), 17, 2)
    with pytest.raises(ValueError, match=r"^channel selection mode 'sampled' draws at random: pass a torch.Generator$"):
        channel_selection(torch.ones(16), 8, 2, "sampled")
    counts = torch.arange(16)  # activation counts, as integers
    assert importance_sampling(counts, 2, 4, gen()).equal(importance_sampling(counts.double(), 2, 4, gen()))
