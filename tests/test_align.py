import pytest
import torch

from cmad.model.align import AlignConfig, CrossModalAlignment


def _paired(n, seed):
    g = torch.Generator().manual_seed(seed)
    geo = torch.randn(n, 6, generator=g)
    w = torch.linspace(-1, 1, 6 * 4).reshape(6, 4)
    app = torch.tanh(geo @ w) + 0.05 * torch.randn(n, 4, generator=g)
    return app, geo


@pytest.mark.parametrize("variant", ["mapping", "latent"])
def test_alignment_flags_inconsistent_pairs(variant):
    app, geo = _paired(3000, 0)
    vapp, vgeo = _paired(500, 1)
    cfg = AlignConfig(variant=variant, hidden=64, epochs=30, batch_size=256, patience=5)
    model = CrossModalAlignment(cfg, seed=0).fit(app, geo, vapp, vgeo)
    tapp, tgeo = _paired(400, 2)
    consistent = model.score(tapp, tgeo)
    swapped = model.score(tapp, tgeo[torch.randperm(400, generator=torch.Generator().manual_seed(5))])
    assert swapped.mean() > 2 * consistent.mean()
    # training reduced the validation loss
    assert min(v for _, v in model.history) < model.history[0][1]


def test_alignment_is_deterministic_and_round_trips():
    app, geo = _paired(1000, 0)
    cfg = AlignConfig(hidden=32, epochs=3)
    a = CrossModalAlignment(cfg, seed=7).fit(app, geo)
    b = CrossModalAlignment(cfg, seed=7).fit(app, geo)
    assert torch.equal(a.score(app[:50], geo[:50]), b.score(app[:50], geo[:50]))
    c = CrossModalAlignment(cfg, seed=7)
    c.load_state_dict(a.state_dict())
    assert torch.equal(a.score(app[:50], geo[:50]), c.score(app[:50], geo[:50]))
