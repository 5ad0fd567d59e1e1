import pytest
import torch

from cmad.model.bank import MemoryBank, greedy_coreset, nearest_distance


def test_nearest_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(300, 16, generator=g)
    b = torch.randn(200, 16, generator=g)
    ref = torch.cdist(q.double(), b.double()).min(1).values.float()
    got = nearest_distance(q, b, chunk=64)
    assert torch.allclose(got, ref, atol=1e-4)


def test_coreset_covers_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(500, 2, generator=g) for c in centres])
    idx = greedy_coreset(pts, 4, seed=3, projection_dim=None)
    chosen = pts[idx]
    # k-center picks one point from each well-separated cluster
    assert torch.cdist(centres, chosen).min(1).values.max() < 1.0
    assert torch.equal(idx, greedy_coreset(pts, 4, seed=3, projection_dim=None))


def test_bank_size_and_scoring():
    g = torch.Generator().manual_seed(2)
    normal = torch.randn(2000, 32, generator=g)
    bank = MemoryBank(fraction=0.05, max_entries=None, seed=0, min_entries=0).fit(normal)
    assert bank.entries == 100
    assert bank.nbytes == 100 * 32 * 4
    near = normal[:50] + 0.01
    far = normal[:50] + 5.0
    assert bank.score(far).min() > bank.score(near).max()


def test_bank_rejects_bad_fraction():
    with pytest.raises(ValueError):
        MemoryBank(fraction=0.0)
    with pytest.raises(RuntimeError):
        MemoryBank().score(torch.zeros(1, 3))
