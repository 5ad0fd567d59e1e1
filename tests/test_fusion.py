"""Normalisation and fusion of branch maps, with statistics from normal data only."""
import numpy as np
import pytest
import torch

from cmad.model.fusion import choose_weights, combine, image_scores, normalise, robust_stats, upsample


def test_robust_stats_are_median_and_p99_spread():
    scores = torch.arange(101, dtype=torch.float32).reshape(1, 1, 101)
    valid = torch.ones_like(scores, dtype=torch.bool)
    loc, scale = robust_stats(scores, valid)
    assert loc == 50.0 and abs(scale - 49.0) < 1e-4
    z = normalise(scores, valid, loc, scale)
    assert float(z[0, 0, 50]) == 0.0 and abs(float(z[0, 0, 99]) - 1.0) < 1e-4


def test_invalid_patches_are_ignored_and_scored_as_the_lowest_valid_patch():
    scores = torch.tensor([[[1.0, 2.0, 1000.0]]])
    valid = torch.tensor([[[True, True, False]]])
    loc, scale = robust_stats(scores, valid)
    assert loc <= 2.0  # the invalid outlier does not move the statistics
    z = normalise(scores, valid, loc, scale)
    assert float(z[0, 0, 2]) == float(z[0, 0, 0]) == min(float(z[0, 0, :2].min()), 0.0)


def test_invalid_fill_is_per_sample_never_above_the_normal_median():
    scores = torch.tensor([[[5.0, 9.0, 0.0]], [[-4.0, 3.0, 0.0]], [[7.0, 7.0, 7.0]]])
    valid = torch.tensor([[[True, True, False]], [[True, True, False]], [[False, False, False]]])
    z = normalise(scores, valid, 0.0, 1.0)
    assert z[0, 0, 2] == 0.0  # lowest valid is 5 > 0: capped at the normal median
    assert z[1, 0, 2] == -4.0  # this sample's own lowest valid patch
    assert torch.equal(z[2], torch.zeros(1, 3))  # nothing valid: neutral


def test_degenerate_statistics_fall_back_to_unit_scale():
    scores = torch.zeros(1, 2, 2)
    loc, scale = robust_stats(scores, torch.ones(1, 2, 2, dtype=torch.bool))
    assert scale == 1.0
    assert robust_stats(scores, torch.zeros(1, 2, 2, dtype=torch.bool)) == (0.0, 1.0)


def test_combine_weights_and_skips_zero_weights():
    a, b = torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0)
    out = combine({"a": a, "b": b}, {"a": 0.25, "b": 0.75})
    assert torch.allclose(out, torch.full((1, 2, 2), 2.5))
    assert torch.equal(combine({"a": a, "b": b}, {"a": 1.0, "b": 0.0}), a)
    with pytest.raises(ValueError):
        combine({"a": a}, {"a": 0.0})


def test_upsample_and_image_scores():
    m = torch.zeros(1, 4, 4)
    m[0, 1, 2] = 1.0
    pix = upsample(m, 32, sigma=0)
    assert pix.shape == (1, 32, 32) and pix.dtype == np.float32
    assert np.unravel_index(pix[0].argmax(), (32, 32))[1] >= 16  # the peak stays in its column
    area = np.ones((1, 32, 32), bool)
    assert image_scores(pix, area)[0] == pytest.approx(pix.max())
    assert image_scores(pix, area, "topk", 4)[0] <= pix.max()
    area[0, :, 16:] = False  # a maximum outside the image area does not count
    assert image_scores(pix, area)[0] < pix.max()


def test_choose_weights_prefers_the_branch_that_sees_the_defects():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(8, 4, 4, dtype=torch.bool)
    gt[4:, 1, 1] = True
    good = torch.randn(8, 4, 4, generator=gen) * 0.1 + gt.float() * 3.0
    noise = torch.randn(8, 4, 4, generator=gen) * 5.0
    labels = np.array([0] * 4 + [1] * 4)
    weights, single = choose_weights({"good": good, "noise": noise}, gt,
                                     torch.ones(8, 4, 4, dtype=torch.bool), labels)
    assert single["good"] > single["noise"]
    assert weights["good"] > weights["noise"]
    assert abs(sum(weights.values()) - 1.0) < 1e-6


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from cmad.model.fusion import rank_auc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + 0.7 * y, 1)  # many ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert rank_auc(np.zeros(5), np.arange(5.0)) == 0.5
