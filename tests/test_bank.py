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


def test_int8_bank_is_a_quarter_and_scores_like_float32():
    g = torch.Generator().manual_seed(4)
    normal = torch.randn(3000, 48, generator=g) * torch.linspace(0.1, 3.0, 48)
    queries = torch.randn(400, 48, generator=g) * torch.linspace(0.1, 3.0, 48)
    kw = dict(fraction=0.05, max_entries=None, seed=0, min_entries=0)
    full = MemoryBank(dtype="float32", **kw).fit(normal)
    small = MemoryBank(dtype="int8", **kw).fit(normal)
    # same coreset, one byte per value plus a low and a step per dimension
    assert small.entries == full.entries == 150
    assert small.nbytes == 150 * 48 + 2 * 48 * 4
    assert small.stored["codes"].dtype == torch.uint8
    # the dequantised entries are within half a step of the float32 ones
    step = small.stored["step"]
    assert ((small.bank - full.bank).abs() <= step / 2 + 1e-6).all()
    a, b = full.score(queries), small.score(queries)
    assert (a - b).abs().max() < 0.02 * a.mean()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999


def test_bank_state_round_trip_per_dtype():
    g = torch.Generator().manual_seed(5)
    normal = torch.randn(1000, 8, generator=g)
    q = torch.randn(50, 8, generator=g)
    for dtype in ("float32", "float16", "int8", "int4"):
        bank = MemoryBank(fraction=0.1, max_entries=None, min_entries=0, dtype=dtype).fit(normal)
        again = MemoryBank()
        again.load_state_dict(bank.state_dict())
        assert again.dtype == dtype
        assert torch.equal(again.score(q), bank.score(q))
        assert again.nbytes == bank.nbytes
    with pytest.raises(ValueError, match="dtype"):
        MemoryBank(dtype="int2")
    with pytest.raises(KeyError, match="low"):
        MemoryBank().load_state_dict({"codes": torch.zeros(2, 2, dtype=torch.uint8)})


def test_constant_dimension_quantises_exactly():
    x = torch.randn(100, 3)
    x[:, 1] = 2.5
    bank = MemoryBank(fraction=0.5, max_entries=None, min_entries=0, dtype="int8").fit(x)
    assert torch.all(bank.bank[:, 1] == 2.5)


@pytest.mark.parametrize("dims", [7, 8])
def test_int4_codes_pack_two_per_byte(dims: int) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(500, dims, generator=g)
    bank = MemoryBank(fraction=0.2, max_entries=None, min_entries=0, dtype="int4").fit(x)
    ref = MemoryBank(fraction=0.2, max_entries=None, min_entries=0).fit(x)
    assert bank.stored["codes4"].shape == (100, (dims + 1) // 2)
    assert bank.nbytes == 100 * ((dims + 1) // 2) + 2 * dims * 4
    step = bank.stored["step"]
    assert ((bank.bank - ref.bank).abs() <= step / 2 + 1e-6).all()
    # every one of the 16 levels is reachable: the extremes decode exactly
    assert torch.allclose(bank.bank.min(0).values, ref.bank.min(0).values)
    assert torch.allclose(bank.bank.max(0).values, ref.bank.max(0).values, atol=1e-5)


def test_one_dimensional_int4_bank_round_trips() -> None:
    x = torch.linspace(0.0, 1.0, 200)[:, None]
    bank = MemoryBank(fraction=0.1, max_entries=None, min_entries=0, dtype="int4").fit(x)
    again = MemoryBank()
    again.load_state_dict(bank.state_dict())
    assert again.dtype == "int4" and torch.equal(again.bank, bank.bank)
    assert (again.bank - MemoryBank(fraction=0.1, max_entries=None, min_entries=0).fit(x).bank
            ).abs().max() <= bank.stored["step"].max() / 2 + 1e-6


def test_mismatched_codes_are_refused() -> None:
    bank = MemoryBank(fraction=0.5, max_entries=None, min_entries=0, dtype="int8").fit(torch.randn(40, 6))
    sd = bank.state_dict()
    sd["low"] = sd["low"][:4]
    with pytest.raises(ValueError, match="do not match"):
        MemoryBank().load_state_dict(sd)
