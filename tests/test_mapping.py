"""The dense cross-modal mapping learns a relation, flags broken pairs, stores exactly."""
from __future__ import annotations

import pytest
import torch

from cmad.errors import ConfigError
from cmad.model.mapping import CrossModalMapping, MappingConfig

D_A, D_B = 12, 10


def paired(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """B is a fixed linear function of A plus a little noise (the same W for every seed)."""
    w = torch.randn(D_A, D_B, generator=torch.Generator().manual_seed(123)) / D_A ** 0.5
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D_A, generator=g) * 2.0 + 1.0
    b = a @ w + noise * torch.randn(n, D_B, generator=g)
    return a, b


def small(**kw) -> MappingConfig:
    base = dict(hidden=32, epochs=30, batch_size=128, patches_per_epoch=2048, patience=4)
    return MappingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fitted() -> CrossModalMapping:
    a, b = paired(3000, 0)
    va, vb = paired(500, 1)
    return CrossModalMapping(small()).fit(a, b, va, vb)


def test_learns_the_relation_and_scores_corrupted_patches_higher(fitted: CrossModalMapping) -> None:
    a, b = paired(400, 2)
    normal = fitted.score(a, b)
    assert normal.shape == (400,)
    b_bad = b.clone()
    b_bad[:20] += 0.8 * b.std(0)  # the second modality no longer fits the first
    a_bad = a.clone()
    a_bad[20:40] = a[torch.arange(20, 40).flip(0)]  # swapped appearances
    bad = fitted.score(a_bad, b_bad)
    threshold = torch.quantile(normal, 0.99)
    assert (bad[:40] > threshold).float().mean() >= 0.95
    assert torch.allclose(bad[40:], normal[40:])
    # both directions fit normal data far better than the variance of the targets
    e_ab, e_ba = fitted.directions(a, b)
    assert e_ab.median() < 3.0 and e_ba.median() < 3.0  # in units of residual variance
    z_b = (b - fitted.stats["b_mean"]) / fitted.stats["b_std"]
    out = fitted.net.a_to_b((a - fitted.stats["a_mean"]) / fitted.stats["a_std"])
    assert out.shape[1] == D_B + 1  # the default loss (nll) predicts a log variance too
    pred_err = (out[:, :D_B] - z_b).pow(2).mean()
    assert float(pred_err.detach()) < 0.05  # explains > 95 % of the standardised variance


def test_early_stopping_keeps_the_best_validation_epoch(fitted: CrossModalMapping) -> None:
    hist = fitted.history
    assert 1 <= len(hist) <= 30
    vals = [v for _, v in hist]
    assert fitted.best_epoch == vals.index(min(vals)) + 1


def test_state_dict_round_trip_gives_identical_scores(fitted: CrossModalMapping) -> None:
    a, b = paired(300, 3)
    sd = fitted.state_dict()
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    other = CrossModalMapping(small())
    other.load_state_dict(sd)
    assert torch.equal(other.score(a, b), fitted.score(a, b))


def test_float16_storage_scores_as_the_rounded_model() -> None:
    a, b = paired(1000, 0)
    m = CrossModalMapping(small(epochs=3)).fit(a, b)
    m.round_to_float16()
    sd = m.state_dict(half=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    other = CrossModalMapping(small(epochs=3))
    other.load_state_dict(sd)
    assert torch.equal(other.score(a[:100], b[:100]), m.score(a[:100], b[:100]))


def test_same_seed_same_model_other_seed_other_model() -> None:
    a, b = paired(1000, 0)
    va, vb = paired(200, 1)
    s1 = CrossModalMapping(small(epochs=4)).fit(a, b, va, vb).score(va, vb)
    s2 = CrossModalMapping(small(epochs=4)).fit(a, b, va, vb).score(va, vb)
    s3 = CrossModalMapping(small(epochs=4, seed=1)).fit(a, b, va, vb).score(va, vb)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


def test_same_model_whatever_the_thread_count() -> None:
    a, b = paired(1000, 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1 = CrossModalMapping(small(epochs=3)).fit(a, b).score(a[:50], b[:50])
        torch.set_num_threads(2)
        s2 = CrossModalMapping(small(epochs=3)).fit(a, b).score(a[:50], b[:50])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(s1, s2)


def test_fit_leaves_the_global_torch_rng_alone() -> None:
    a, b = paired(500, 0)
    torch.manual_seed(7)
    expect = torch.rand(3)
    torch.manual_seed(7)
    CrossModalMapping(small(epochs=1)).fit(a, b)
    assert torch.equal(torch.rand(3), expect)


def test_cosine_loss_and_product_combine() -> None:
    a, b = paired(2000, 0)
    m = CrossModalMapping(small(loss="cosine", combine="product")).fit(a, b)
    ta, tb = paired(200, 2)
    normal = m.score(ta, tb)
    e_ab, e_ba = m.directions(ta, tb)
    assert torch.allclose(normal, e_ab * e_ba)
    tb_bad = tb[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert m.score(ta, tb_bad).median() > 5 * normal.median()


def test_errors() -> None:
    m = CrossModalMapping(small())
    a, b = paired(100, 0)
    with pytest.raises(RuntimeError):
        m.score(a, b)
    with pytest.raises(ValueError):
        m.fit(a, b[:50])
    with pytest.raises(ValueError):
        m.fit(a, b, a[:10, :5], b[:10])
    with pytest.raises(ValueError):
        m.load_state_dict({"a_mean": torch.zeros(3)})
    a_nan = a.clone()
    a_nan[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.fit(a_nan, b)
    with pytest.raises(ConfigError):
        MappingConfig(loss="l1")
    with pytest.raises(ConfigError):
        MappingConfig(hidden=0)
    with pytest.raises(ConfigError):
        MappingConfig.from_dict({"depth": 3})
    assert MappingConfig.from_dict(MappingConfig().to_dict()) == MappingConfig()


def heteroscedastic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = A W plus noise whose size A's first feature sets (x20 from one end to the
    other): the relation is exact where it is small and loose where it is large."""
    w = torch.randn(D_A, D_B, generator=torch.Generator().manual_seed(123)) / D_A ** 0.5
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D_A, generator=g)
    sd = 0.02 + 0.4 * torch.sigmoid(2.0 * a[:, 0])
    b = a @ w + sd[:, None] * torch.randn(n, D_B, generator=g)
    return a, b, sd


def test_nll_learns_where_normal_pairs_are_loose_and_scores_by_it() -> None:
    a, b, _ = heteroscedastic(6000, 0)
    va, vb, _ = heteroscedastic(1000, 1)
    m = CrossModalMapping(small(loss="nll", epochs=40)).fit(a, b, va, vb)
    # the nll loss goes below 0; early stopping still keeps the best validation epoch
    vals = [v for _, v in m.history]
    best = vals[m.best_epoch - 1]
    assert min(vals) < 0 and best - min(vals) <= 1e-4 * abs(best)  # later gains under 1e-4
    assert all(v > best for v in vals[: m.best_epoch - 1])
    ta, tb, sd = heteroscedastic(2000, 2)
    za, zb = m._standardise(ta, tb)
    with torch.inference_mode():
        (_, logvar), _ = m._pair_errors(m.net, za, zb, weighted=True)
    # the predicted variance follows the true noise level
    assert torch.corrcoef(torch.stack([logvar, sd.log()]))[0, 1] > 0.8
    det, loc = m.score_pair(ta, tb)
    assert torch.equal(det, m.score(ta, tb)) and not torch.equal(det, loc)
    e_ab, e_ba = m.directions(ta, tb)
    assert torch.allclose(loc, e_ab + e_ba)
    # the same absolute break of the pair: the plain error is about as high in tight and
    # loose regions, the detection score far higher where normal pairs are tight
    bad = tb + 0.3 * tb.std(0)
    d_bad, l_bad = m.score_pair(ta, bad)
    tight, loose = sd < 0.08, sd > 0.35
    assert tight.sum() > 100 and loose.sum() > 100
    assert (d_bad[tight] - det[tight]).median() > 3 * (d_bad[loose] - det[loose]).median()
    assert (l_bad[tight] - loc[tight]).median() < 3 * (l_bad[loose] - loc[loose]).median()


def test_nll_state_round_trip_and_a_loss_mismatch_is_named() -> None:
    a, b, _ = heteroscedastic(1000, 0)
    m = CrossModalMapping(small(loss="nll", epochs=3)).fit(a, b)
    m.round_to_float16()
    sd = m.state_dict(half=True)
    other = CrossModalMapping(small(loss="nll", epochs=3))
    other.load_state_dict(sd)
    assert all(torch.equal(x, y) for x, y in zip(other.score_pair(a[:50], b[:50]),
                                                 m.score_pair(a[:50], b[:50])))
    with pytest.raises(ValueError, match="variance outputs"):
        CrossModalMapping(small(loss="mse")).load_state_dict(sd)
    plain = CrossModalMapping(small(loss="mse", epochs=3)).fit(a, b)
    det, loc = plain.score_pair(a[:50], b[:50])
    assert torch.equal(det, loc)
    with pytest.raises(ValueError, match="variance outputs"):
        CrossModalMapping(small(loss="nll")).load_state_dict(plain.state_dict())
