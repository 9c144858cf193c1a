"""The MoE Jetpack benchmark runs end to end in quick mode with its own (cached) pre-training and writes every
summary key of the issue, the curves and the ablation plot."""

import json

import pytest

from upcycle.methods.jetpack import bench as jetpack


def test_epochs_to_reach():
    assert jetpack.epochs_to_reach([0.2, 0.5, 0.7, 0.7], 0.7) == 3
    assert jetpack.epochs_to_reach([0.2, 0.5], 0.7) is None


def test_summary_puts_the_papers_numbers_beside_ours_and_both_speedups():
    curves = {"dense_scratch": [0.1, 0.2, 0.3, 0.4], "dense_pretrained": [0.5, 0.6, 0.7, 0.8],
              "softmoe_scratch": [0.2, 0.3, 0.4, 0.5], "jetpack": [0.8, 0.85, 0.9, 0.9],
              "sparse_upcycling": [0.7, 0.8, 0.85, 0.95]}  # fmt: skip
    rows = [{"kind": "main", "family": "vit", "data": data, "column": column, "val_curve": curve, "test": curve[-1]}
            for data in ("mnist5k", "digits") for column, curve in curves.items()]  # fmt: skip
    summary = jetpack.summarize(rows, jetpack.QUICK)
    assert summary["mnist5k.convergence_speedup"] == 4.0  # Soft MoE reaches 0.5 at epoch 4, MoE Jetpack at 1
    assert summary["mnist5k.convergence_speedup_vs_dense_pretrained"] == 4.0  # 0.8: epoch 4 against epoch 1
    assert summary["digits.ordering_holds"] is True and summary["digits.jetpack_ge_sparse_upcycling"] is False
    assert summary["mnist5k.jetpack.paper_imagenet"] == 79.9
    assert summary["mnist5k.sparse_upcycling.paper_imagenet"] == 79.1
    assert summary["mnist5k.softmoe_scratch.paper_small_sets_mean"] == 69.4  # the paper's seven small sets
    assert summary["paper"]["convergence_speedup"]["small_sets_up_to"] == 8.0


def test_the_baselines_are_built_as_the_papers_build_them(tmp_path):
    """Soft MoE from scratch: one full-width single-slot expert per token behind a normalised router; sparse
    upcycling: copies of the model's own FFN in the same SpheroMoE layer as the jetpack column; a preset row turns
    on the released code's switches."""
    import torch

    import upcycle
    from upcycle.layers import moe_layers
    from upcycle.pretrain import build_dense

    family = jetpack.QUICK.families[0]
    soft = jetpack.build_column("softmoe_scratch", family, {}, "digits", 0, 8)
    ((_, layer),) = moe_layers(soft)
    dense = build_dense(family.target[0], num_classes=10, **family.target[1])
    tokens = dense.patch_embed.num_patches + 1
    assert (layer.experts.num_core, layer.experts.num_universal) == (tokens, 0)
    assert layer.experts.core.d_hidden == dense.blocks[1].mlp.fc1.out_features
    assert type(layer.router).__name__ == "SoftMoERouter" and layer.router.normalize
    upcycle.save(dense, tmp_path / "t")
    checkpoints = {"target": tmp_path / "t", "predecessor": tmp_path / "t"}
    copies = jetpack.build_column("sparse_upcycling", family, checkpoints, "digits", 0, 8)
    ((_, layer),) = moe_layers(copies)
    assert type(layer.router).__name__ == "SpheroMoERouter" and not layer.router.key_norm  # our defaults
    assert all(torch.equal(w, dense.blocks[1].mlp.fc1.weight) for w in layer.experts.core.w_up)
    released = jetpack.build_column("jetpack", family, checkpoints, "digits", 0, 8, {"preset": "released"})
    ((_, layer),) = moe_layers(released)
    assert layer.router.key_norm and layer.router.combine == "entmax15" and layer.router.noise_in_eval
    assert layer.experts.drop_path == 0.1 and layer.experts.dropout_variant == "released"
    assert released.global_pool == "avg"


@pytest.mark.slow
def test_bench_jetpack_quick(tmp_path, monkeypatch):
    from upcycle.data.paths import data_root

    monkeypatch.setenv("UPCYCLE_DATA", str(data_root()))  # the datasets stay where make data put them
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))  # pre-training is cached afresh
    result = jetpack.run(out=tmp_path, quick=True, progress=False)
    payload = json.loads((tmp_path / "jetpack.json").read_text())
    summary = payload["summary"]
    assert result["summary"] == summary
    for data in ("mnist5k", "digits"):
        for column in jetpack.COLUMNS:
            assert 0.0 <= summary[f"{data}.{column}"] <= 1.0
    assert "convergence_speedup" in summary and summary["pretrain_seconds"] > 0
    rows = payload["rows"]
    main = [r for r in rows if r["kind"] == "main"]
    assert len(main) == 2 * len(jetpack.COLUMNS)
    assert all(len(r["val_curve"]) == 2 and r["macs_per_image"] > 0 for r in main)
    moe = next(r for r in main if r["column"] == "jetpack")
    dense = next(r for r in main if r["column"] == "dense_pretrained")
    assert moe["parameters"] > dense["parameters"]  # the experts add parameters, not proportional compute
    assert {r["variant"] for r in rows if r["kind"] == "ablation"} >= {"strategy=copy (sparse upcycling)"}
    for name in ("jetpack_curves.png", "jetpack_ablation.png"):
        assert (tmp_path / name).stat().st_size > 10_000
