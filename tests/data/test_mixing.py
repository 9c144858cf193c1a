import pytest
import torch
import torch.nn.functional as F

from upcycle.data.mixing import cutmix, cutmix_box, mix_batch, mixup, one_hot, soft_cross_entropy


def test_mixup_by_hand():
    x = torch.tensor([[1.0, 1.0], [3.0, 5.0]])  # [B=2, 2]
    y = one_hot(torch.tensor([0, 2]), 3)
    mx, my = mixup(x, y, lam=0.25, perm=torch.tensor([1, 0]))
    # row 0: 0.25 * [1, 1] + 0.75 * [3, 5] = [2.5, 4.0]; row 1: 0.25 * [3, 5] + 0.75 * [1, 1] = [1.5, 2.0]
    assert torch.allclose(mx, torch.tensor([[2.5, 4.0], [1.5, 2.0]]))
    assert torch.allclose(my, torch.tensor([[0.25, 0.0, 0.75], [0.75, 0.0, 0.25]]))


def test_cutmix_by_hand():
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])  # [2, 1, 4, 4]
    y = one_hot(torch.tensor([0, 1]), 2)
    mx, my, lam = cutmix(x, y, box=(0, 2, 1, 3), perm=torch.tensor([1, 0]))
    assert lam == 1 - 4 / 16  # a 2x2 box of 16 pixels
    expected0 = torch.zeros(4, 4)
    expected0[0:2, 1:3] = 1
    assert torch.equal(mx[0, 0], expected0) and torch.equal(mx[1, 0], 1 - expected0)
    assert torch.allclose(my, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert torch.equal(x[0], torch.zeros(1, 4, 4))  # the input is not modified


def test_cutmix_box_area_and_bounds():
    g = torch.Generator().manual_seed(0)
    top, bottom, left, right = cutmix_box(32, 32, 1.0, g)
    assert (bottom - top) * (right - left) == 0  # lam 1: nothing pasted
    for lam in (0.0, 0.3, 0.75):
        top, bottom, left, right = cutmix_box(32, 32, lam, g)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert (bottom - top) * (right - left) <= (1 - lam) * 32 * 32  # about 1 - lam of the image, less if clipped


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(6, 3, 8, 8, generator=g), "labels": torch.arange(6), "id": torch.arange(6)}


def test_mix_batch_mixup_is_a_convex_combination():
    batch = _batch()
    out = mix_batch(batch, 6, mixup_alpha=0.4, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(0))
    lam = float(out["lam"])
    assert out["labels"].shape == (6, 6) and torch.allclose(out["labels"].sum(1), torch.ones(6))
    assert torch.equal(out["id"], batch["id"])
    for i in range(6):  # labels are distinct classes, so each row names its partner
        row = out["labels"][i]
        others = [j for j in range(6) if j != i and float(row[j]) > 0]
        partner = others[0] if others else i  # a permutation may map i to itself
        assert torch.allclose(out["x"][i], lam * batch["x"][i] + (1 - lam) * batch["x"][partner], atol=1e-6)
        assert abs(float(row[i]) - (lam if partner != i else 1.0)) < 1e-6


def test_mix_batch_cutmix_labels_match_pixels():
    batch = _batch()
    out = mix_batch(batch, 6, mixup_alpha=0.0, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(2))
    changed = (out["x"] != batch["x"]).any(dim=1).float().mean(dim=(1, 2))  # fraction of pixels replaced, [B]
    lam = float(out["lam"])
    own = out["labels"].diagonal()  # lam, or 1 where the permutation maps a row to itself
    assert torch.allclose(own[own < 1], torch.full_like(own[own < 1], lam))
    assert torch.allclose(changed, 1 - own, atol=1e-6)


def test_mix_batch_prob_zero_and_determinism():
    batch = _batch()
    out = mix_batch(batch, 10, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["x"], batch["x"]) and float(out["lam"]) == 1.0
    assert torch.equal(out["labels"], F.one_hot(batch["labels"], 10).float())
    a = mix_batch(batch, 10, generator=torch.Generator().manual_seed(5))
    b = mix_batch(batch, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(batch["labels"], torch.arange(6))  # the input batch is untouched


def test_mix_batch_accepts_soft_labels():
    batch = _batch()
    batch["labels"] = torch.full((6, 4), 0.25)
    out = mix_batch(batch, 4, mixup_alpha=1.0, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["labels"], torch.full((6, 4), 0.25))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_soft_ce_matches_cross_entropy_for_hard_labels(smoothing):
    logits, targets = torch.randn(16, 7), torch.randint(0, 7, (16,))
    expected = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    assert torch.allclose(soft_cross_entropy(logits, targets, smoothing), expected, atol=1e-6)
    soft = F.one_hot(targets, 7).float()
    assert torch.allclose(soft_cross_entropy(logits, soft, smoothing), expected, atol=1e-6)


def test_soft_ce_by_hand_and_token_logits():
    logits = torch.zeros(1, 2)  # uniform: log p = log(1/2) for both classes
    assert torch.allclose(soft_cross_entropy(logits, torch.tensor([[0.3, 0.7]])), torch.log(torch.tensor(2.0)))
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))  # language-model shapes [B, T, V]
    targets[0, :2] = -100
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(soft_cross_entropy(logits, targets), expected, atol=1e-6)
    with pytest.raises(ValueError, match="must match"):
        soft_cross_entropy(torch.randn(3, 4), torch.rand(3, 5))
