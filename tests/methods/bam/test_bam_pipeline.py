"""The BAM / BTX pipeline end to end on a tiny parallel-block LM and the real text domains: phases, resumption,
the compute-matched dense run, the recipe's refusals, and the CLI."""

import json

import pytest
import torch

from upcycle.cli import main
from upcycle.methods.bam import load_recipe, run_bam
from upcycle.pretrain import build_dense

TRAIN = {"batch_size": 4, "seq_len": 32, "log_every": 1, "eval_batches": 1}
TINY_RECIPE = {"domains": ["shakespeare", "python_docs"], "branch": {**TRAIN, "steps": 2},
               "mix": {**TRAIN, "steps": 2}, "eval_sequences": 8}  # fmt: skip


def tiny_seed():
    return build_dense("lm_tiny_parallel", hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()


def test_pipeline_runs_resumes_and_matches_compute(tmp_path):
    seed = tiny_seed()
    summary = run_bam(seed, TINY_RECIPE, tmp_path, progress=False, timing=False)
    for phase in ("branch-shakespeare", "branch-python_docs", "mix-btx", "mix-bam_expert_kv", "mix-bam_shared_kv",
                  "dense-continued", "dense-mix-compute", "dense-same-tokens"):  # fmt: skip
        assert (tmp_path / phase / "model" / "config.json").is_file(), phase
    models = summary["models"]
    assert set(models) == {"seed", "branch-shakespeare", "branch-python_docs", "btx", "bam_expert_kv",
                           "bam_shared_kv", "dense_continued", "dense_mix_compute", "dense_same_tokens"}  # fmt: skip
    for name in ("btx", "bam_expert_kv", "bam_shared_kv", "dense_continued", "dense_mix_compute", "dense_same_tokens",
                 "seed"):  # fmt: skip
        assert summary[f"{name}_ppl"] == models[name]["test"]["average"] > 1
    assert summary["bam_over_btx"] == pytest.approx(summary["bam_expert_kv_ppl"] / summary["btx_ppl"])
    assert set(models["btx"]["val"]) == {"shakespeare", "python_docs", "average"}
    # experts: seed + 2 branches; BAM runs every attention expert, so it costs more per token than BTX
    costs = {name: models[name]["macs_per_token"] for name in ("seed", "btx", "bam_expert_kv", "bam_shared_kv")}
    assert costs["seed"] < costs["btx"] < costs["bam_shared_kv"] < costs["bam_expert_kv"]
    assert models["btx"]["params_active"] < models["btx"]["params_total"]
    compute = json.loads((tmp_path / "dense-continued" / "compute.json").read_text())
    assert compute["branch_steps"] == 4
    assert compute["steps"] == round(4 + 2 * compute["mix_macs_ratio"]) and compute["mix_macs_ratio"] > 1.5
    mix_only = json.loads((tmp_path / "dense-mix-compute" / "stage.json").read_text())["steps"]
    assert mix_only == compute["steps"] - 4
    assert compute["same_tokens_steps"] == 4 + 2  # equal data: the branches' and the mixture's steps, in one model
    assert json.loads((tmp_path / "dense-same-tokens" / "stage.json").read_text())["steps"] == 6
    routing = models["btx"]["expert_usage"]["shakespeare"]
    assert 0 <= routing["ffn_load_entropy"] <= 1 and 0 <= routing["ffn_token_entropy"] <= 1
    assert 1 / 3 <= routing["ffn_top_probability"] <= 1 and routing["attention_token_entropy"] is None
    assert 0 < models["bam_expert_kv"]["expert_usage"]["shakespeare"]["attention_token_entropy"] <= 1
    assert (tmp_path / "bam.png").stat().st_size > 10_000 and (tmp_path / "routing.png").stat().st_size > 10_000
    usage = models["bam_shared_kv"]["expert_usage"]
    assert set(usage) == {"shakespeare", "python_docs"} and len(usage["python_docs"]["ffn"]) == 3  # seed + 2
    assert sum(usage["python_docs"]["ffn"]) == pytest.approx(1.0) and "expert_usage" not in models["seed"]
    assert json.loads((tmp_path / "summary.json").read_text())["btx_ppl"] == summary["btx_ppl"]

    stamp = (tmp_path / "mix-bam_expert_kv" / "model" / "config.json").stat().st_mtime_ns
    again = run_bam(seed, TINY_RECIPE, tmp_path, progress=False, timing=False)  # every phase loads
    assert (tmp_path / "mix-bam_expert_kv" / "model" / "config.json").stat().st_mtime_ns == stamp
    assert again["bam_expert_kv_ppl"] == summary["bam_expert_kv_ppl"]

    changed = {**TINY_RECIPE, "mix": {**TRAIN, "steps": 3}}
    with pytest.raises(ValueError, match="holds this stage for another recipe"):
        run_bam(seed, changed, tmp_path, progress=False, timing=False)


def test_compute_matched_bam_trains_for_btx_mix_compute(tmp_path):
    """The paper's compute-matched runs: each BAM variant's mixture trained for mix steps × MACs(btx) / MACs(bam)."""
    recipe = {**TINY_RECIPE, "mix": {**TRAIN, "steps": 5}, "variants": ["btx", "bam_expert_kv"],
              "dense_continued": False, "compute_matched": True}  # fmt: skip
    summary = run_bam(tiny_seed(), recipe, tmp_path, progress=False, timing=False)
    budget = json.loads((tmp_path / "mix-bam_expert_kv-cm" / "compute.json").read_text())
    assert budget["macs_ratio_to_btx"] > 1.5 and budget["steps"] == round(5 / budget["macs_ratio_to_btx"]) < 5
    assert json.loads((tmp_path / "mix-bam_expert_kv-cm" / "stage.json").read_text())["compute_matched"] == budget
    assert summary["bam_cm_over_btx"] == pytest.approx(summary["bam_expert_kv_cm_ppl"] / summary["btx_ppl"])
    assert summary["bam_expert_kv_cm_ppl"] != summary["bam_expert_kv_ppl"]


def test_the_dense_run_at_mix_phase_compute_is_optional(tmp_path):
    recipe = {**TINY_RECIPE, "variants": ["btx"], "compute_reference": "btx", "dense_mix_compute": False}
    summary = run_bam(tiny_seed(), recipe, tmp_path, progress=False, timing=False)
    assert not (tmp_path / "dense-mix-compute").exists() and "dense_mix_compute_ppl" not in summary
    assert summary["dense_continued_ppl"] > 0 and summary["dense_same_tokens_ppl"] > 0


def test_btx_routing_can_follow_the_btx_paper():
    """btx_top_k / btx_renormalize give BTX's mixture its own router (the BTX paper: softmax over the top-2); BAM's
    keeps top_k / renormalize, and unset they follow them (BAM's BTX baseline)."""
    from upcycle.layers import moe_layers
    from upcycle.methods.bam.pipeline import merged

    seed = tiny_seed()
    branches = {d: build_dense("lm_tiny_parallel", hidden_size=32, intermediate_size=64, num_hidden_layers=2).eval()
                for d in TINY_RECIPE["domains"]}  # fmt: skip
    ids = torch.randint(0, 256, (2, 12))
    baseline = load_recipe(TINY_RECIPE)
    paper = load_recipe({**TINY_RECIPE, "btx_top_k": 2, "btx_renormalize": True})
    assert baseline.routing("btx") == {"top_k": 1, "renormalize": False} == paper.routing("bam_expert_kv")
    routers = {}
    for name, recipe in (("baseline", baseline), ("paper", paper)):
        btx = merged(seed, branches, recipe, "btx")
        router = moe_layers(btx)[0][1].router
        routers[name] = (router.top_k, router.renormalize, btx(input_ids=ids).logits)
    assert routers["baseline"][:2] == (1, False) and routers["paper"][:2] == (2, True)
    assert not torch.allclose(routers["baseline"][2], routers["paper"][2])
    bam = merged(seed, branches, paper, "bam_expert_kv")
    assert moe_layers(bam)[0][1].router.top_k == 1


def test_trained_mixtures_keep_their_routing_and_aux_losses(tmp_path):
    import upcycle
    from upcycle.layers import collect_aux_losses
    from upcycle.record import record_of

    run_bam(tiny_seed(), {**TINY_RECIPE, "variants": ["bam_expert_kv"], "dense_continued": False}, tmp_path,
            progress=False, timing=False)  # fmt: skip
    bam = upcycle.load(tmp_path / "mix-bam_expert_kv" / "model")
    assert type(bam).__name__ == "UpcycleBAMForCausalLM"
    assert record_of(bam).merge["expert_names"] == ["seed", "shakespeare", "python_docs"]
    bam.train()(input_ids=torch.randint(0, 256, (2, 16)))
    assert set(collect_aux_losses(bam)) == {"load_balancing", "z_loss"}
    import csv

    with open(tmp_path / "mix-bam_expert_kv" / "metrics.csv") as handle:
        train_rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    assert all(float(row["aux"]) > 0 for row in train_rows)  # the mixture phase trained with its router losses


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"domains": ["shakespeare", "poetry"]}, "unknown domain"),
        ({"domains": ["shakespeare", "shakespeare"]}, "distinct"),
        ({"top_k": 5}, "larger than the 4 experts"),
        ({"branch": {"epochs": 1}}, "need steps, not epochs"),
        ({"variants": ["btx"]}, "compute_reference"),
        ({"mix": {"lr": -1}}, "lr"),
        ({"variants": ["bam"]}, "variants"),
        ({"btx_top_k": 5}, "btx_top_k=5 is larger than the 4 experts"),
        ({"compute_matched": True, "variants": ["bam_expert_kv"], "dense_continued": False}, "compute_matched"),
    ],
)
def test_bad_recipes_are_refused(recipe, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe)


def test_cli(tmp_path, capsys):
    from upcycle import save

    save(tiny_seed(), tmp_path / "seed")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"bam": {**TINY_RECIPE, "variants": ["btx", "bam_shared_kv"],
                                          "dense_continued": False}}))  # fmt: skip
    code = main(["bam", str(tmp_path / "seed"), "--recipe", str(recipe), "--out", str(tmp_path / "run"),
                 "--set", "top_k=2"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "btx: average held-out test perplexity" in printed and "bam_shared_kv" in printed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recipe"]["top_k"] == 2
    code = main(["export", str(tmp_path / "run" / "mix-bam_shared_kv" / "model"), "--format", "bam", "--out",
                 str(tmp_path / "hf")])  # fmt: skip
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file()


def test_each_branch_trains_on_the_users_text(tmp_path, monkeypatch):
    """domains: {name: SPEC}: one branch per file of the user's text, mixed and evaluated per domain."""
    import random

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path / "data-cache"))
    rng = random.Random(0)
    for name, words in (("recipes", ["flour", "salt", "bake", "stir"]), ("law", ["court", "shall", "party", "act"])):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40))
                                                          for _ in range(30)))  # fmt: skip
    domains = {"recipes": str(tmp_path / "recipes.txt"), "law": str(tmp_path / "law.txt")}
    recipe = {**TINY_RECIPE, "domains": domains, "variants": ["btx"], "dense_continued": False}
    summary = run_bam(tiny_seed(), recipe, tmp_path / "run", progress=False, timing=False)
    assert (tmp_path / "run" / "branch-recipes" / "model").is_dir() and (tmp_path / "run" / "branch-law").is_dir()
    assert set(summary["models"]["btx"]["test"]) == {"recipes", "law", "average"}
    assert set(summary["models"]["btx"]["expert_usage"]) == {"recipes", "law"}
    with pytest.raises(ValueError, match="mixed by the text_mixture dataset"):
        load_recipe({**recipe, "data": "shakespeare"})
