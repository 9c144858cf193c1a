"""Drop-Upcycling (arXiv 2502.19261), checked on tiny FFNs and models built here: r = 0 is sparse upcycling draw for
draw (and dense-equivalent), r = 1 redraws every unit with the dense matrices' statistics, 0 < r < 1 redraws exactly
⌊r·h⌋ whole units per expert (a different set per expert) and copies the rest, a seed fixes the model, the released
script's per-matrix unit sets and replaced-rows statistics are options that do what they say, and the CLI reaches
the method, in memory and streamed."""

import pytest
import torch

import upcycle
from tests.conversion.tiny_models import build
from upcycle.adapters.dense_ffn import DenseFFN
from upcycle.cli import main
from upcycle.config import load_convert_config
from upcycle.layers import moe_layers
from upcycle.methods.drop_upcycling.recycling import drop_upcycling

D, H, E = 24, 40, 4


def dense_ffn(d: int = D, h: int = H, biased: bool = True, gated: bool = True, seed: int = 0) -> DenseFFN:
    """Matrices with their own non-zero means and stds, so drawing from the wrong statistics shows."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, mean=0.0, std=1.0):
        return torch.randn(*shape, generator=g) * std + mean

    return DenseFFN(w_up=draw(h, d, mean=0.3, std=0.5), w_down=draw(d, h, mean=-0.2, std=0.1), activation="silu",
                    w_gate=draw(h, d, mean=0.1, std=2.0) if gated else None, b_up=draw(h, mean=1.0) if biased else None,
                    b_gate=draw(h, mean=-1.0, std=0.3) if biased and gated else None,
                    b_down=draw(d) if biased else None)  # fmt: skip


def upcycled(dense: DenseFFN, seed: int = 1, **options):
    config = load_convert_config(method="drop_upcycling", num_experts=E, top_k=2, **options)
    return drop_upcycling(dense, config, torch.Generator().manual_seed(seed))


def changed_units(expert: torch.Tensor, dense: torch.Tensor, axis: int) -> set[int]:
    """The hidden units (rows for axis 0, columns for axis 1) where an expert's matrix is not the dense one."""
    differs = (expert != dense).any(dim=1 - axis) if expert.dim() == 2 else expert != dense
    return set(torch.nonzero(differs).flatten().tolist())


def units_per_matrix(moe, dense: DenseFFN, i: int) -> dict[str, set[int]]:
    experts = moe.experts
    return {
        "w_up": changed_units(experts.w_up[i], dense.w_up, 0),
        "w_gate": changed_units(experts.w_gate[i], dense.w_gate, 0),
        "w_down": changed_units(experts.w_down[i], dense.w_down, 1),
        "b_up": changed_units(experts.b_up[i], dense.b_up, 0),
        "b_gate": changed_units(experts.b_gate[i], dense.b_gate, 0),
    }


# ---- r = 0: sparse upcycling, exactly -----------------------------------------------------------------------------
def test_ratio_zero_is_sparse_upcycling_and_dense_equivalent():
    dense = build("llama")
    settings = dict(num_experts=4, top_k=2, router_init_std=1.0, seed=3, progress=False)
    dropped = upcycle.convert(dense, "drop_upcycling", drop_ratio=0.0, **settings)
    copied = upcycle.convert(dense, "sparse_upcycling", **settings)
    copies = copied.state_dict()
    for name, tensor in dropped.state_dict().items():
        assert torch.equal(tensor, copies[name]), name
    assert upcycle.verify(dropped, dense) <= 1e-4


def test_a_positive_ratio_is_not_dense_equivalent():
    dense = build("llama")
    moe = upcycle.convert(dense, "drop_upcycling", num_experts=4, top_k=2, drop_ratio=0.5, progress=False)
    assert upcycle.verify(moe, dense) > 1e-3


# ---- 0 < r < 1: exactly ⌊r·h⌋ whole units per expert ---------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_each_expert_redraws_exactly_floor_r_h_whole_units_and_copies_the_rest(ratio):
    dense = dense_ffn()
    moe = upcycled(dense, drop_ratio=ratio)
    expected = int(ratio * H + 1e-9)  # 10, 20, 28
    for i in range(E):
        units = units_per_matrix(moe, dense, i)
        assert len(units["w_up"]) == expected
        assert all(found == units["w_up"] for found in units.values()), "one unit set for every matrix and bias"
        kept = sorted(set(range(H)) - units["w_up"])
        torch.testing.assert_close(moe.experts.w_up[i][kept], dense.w_up[kept], rtol=0, atol=0)
        torch.testing.assert_close(moe.experts.w_down[i][:, kept], dense.w_down[:, kept], rtol=0, atol=0)
        assert torch.equal(moe.experts.b_down[i], dense.b_down), "b_down belongs to no unit"


def test_different_experts_redraw_different_units():
    dense = dense_ffn()
    moe = upcycled(dense, drop_ratio=0.5)
    sets = [frozenset(units_per_matrix(moe, dense, i)["w_up"]) for i in range(E)]
    assert len(set(sets)) == E


def test_the_seed_fixes_the_model():
    dense = dense_ffn()
    first, again, other = (upcycled(dense, seed=seed, drop_ratio=0.5).state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["experts.w_up"], other["experts.w_up"])


def test_an_ungated_unbiased_ffn_is_redrawn_too():
    dense = dense_ffn(biased=False, gated=False)
    moe = upcycled(dense, drop_ratio=0.5)
    assert moe.experts.w_gate is None and moe.experts.b_up is None
    for i in range(E):
        up = changed_units(moe.experts.w_up[i], dense.w_up, 0)
        assert len(up) == H // 2 and up == changed_units(moe.experts.w_down[i], dense.w_down, 1)


# ---- r = 1: every unit new, the dense statistics kept ---------------------------------------------------------------
def test_ratio_one_redraws_every_unit_with_each_matrix_own_mean_and_std():
    dense = dense_ffn(d=64, h=256)
    moe = upcycled(dense, drop_ratio=1.0)
    for name in ("w_up", "w_gate", "w_down", "b_up", "b_gate"):
        source, redrawn = getattr(dense, name), getattr(moe.experts, name)
        for i in range(E):
            axis = 1 if name == "w_down" else 0
            assert changed_units(redrawn[i], source, axis) == set(range(256)), f"{name}: expert {i} kept a unit"
            # fp32 sampling error of a mean over n draws is std/√n: a bias (256 draws) gets a looser bound
            tolerance = 4 * source.std() / source.numel() ** 0.5
            assert abs(redrawn[i].mean() - source.mean()) < tolerance, name
            assert abs(redrawn[i].std() / source.std() - 1) < (0.03 if source.dim() == 2 else 0.15), name


# ---- the released script's variants ---------------------------------------------------------------------------------
def test_per_matrix_sets_redraw_independent_units_in_each_matrix():
    dense = dense_ffn()
    moe = upcycled(dense, drop_ratio=0.5, index_sets="per_matrix")
    mismatched = 0
    for i in range(E):
        units = units_per_matrix(moe, dense, i)
        assert all(len(found) == H // 2 for found in units.values())
        assert units["b_up"] == units["w_up"] and units["b_gate"] == units["w_gate"], "a bias follows its matrix"
        mismatched += units["w_up"] != units["w_down"] or units["w_up"] != units["w_gate"]
    assert mismatched == E


@pytest.mark.parametrize("statistics", ["matrix", "dropped"])
def test_statistics_come_from_the_whole_matrix_or_from_the_replaced_rows(statistics):
    """W_up rows at very different levels with little spread inside a row; one unit redrawn per expert: the whole
    matrix spreads ~180, the replaced row ~0.01, so the new row's spread says which statistics were used."""
    d, h = 512, 64
    dense = dense_ffn(d=d, h=h, biased=False)
    dense.w_up = 10.0 * torch.arange(h, dtype=torch.float32)[:, None] + 0.01 * torch.randn(
        h, d, generator=torch.Generator().manual_seed(5)
    )
    moe = upcycled(dense, seed=4, drop_ratio=0.02, statistics=statistics)  # ⌊0.02·64⌋ = 1 unit
    for i in range(E):
        (row,) = changed_units(moe.experts.w_up[i], dense.w_up, 0)
        new, reference = moe.experts.w_up[i][row], dense.w_up if statistics == "matrix" else dense.w_up[row]
        assert dense.w_up.std() > 1000 * dense.w_up[row].std(), "the two references must be told apart"
        assert abs(new.mean() - reference.mean()) < 4 * reference.std() / d**0.5
        assert abs(new.std() / reference.std() - 1) < 0.1


def test_options_are_validated():
    with pytest.raises(Exception, match="drop_ratio"):
        upcycled(dense_ffn(), drop_ratio=1.5)
    with pytest.raises(Exception, match="index_sets"):
        upcycled(dense_ffn(), index_sets="some")


# ---- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_converts_with_a_drop_ratio(tmp_path):
    build("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "moe"
    args = ["convert", str(tmp_path / "llama"), "--method", "drop_upcycling", "--set", "drop_ratio=0.5",
            "--experts", "8", "--top-k", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    moe = upcycle.load(out)
    (_, layer), *_ = moe_layers(moe)
    w_up = layer.experts.w_up  # [E, h, d]
    assert w_up.shape[0] == 8
    assert not torch.equal(w_up[0], w_up[1]), "experts start different"


def test_a_streamed_conversion_draws_the_same_model(tmp_path):
    """Streaming converts layer by layer from the files; it must give the in-memory conversion's draws. It checks
    each layer against the dense FFN, which r > 0 breaks on purpose: --no-check."""
    build("llama").save_pretrained(tmp_path / "llama")
    common = ["--method", "drop_upcycling", "--experts", "4", "--top-k", "2"]
    assert main(["convert", str(tmp_path / "llama"), *common, "--out", str(tmp_path / "memory")]) == 0
    assert main(["convert", str(tmp_path / "llama"), *common, "--stream", "--out", str(tmp_path / "checked")]) != 0
    assert main(["convert", str(tmp_path / "llama"), *common, "--stream", "--no-check",
                 "--out", str(tmp_path / "streamed")]) == 0  # fmt: skip
    memory, streamed = (upcycle.load(tmp_path / name).state_dict() for name in ("memory", "streamed"))
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[name], streamed[name]) for name in memory)
