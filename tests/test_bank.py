import numba
import numpy as np
import pytest
import torch

from cmad.model.bank import MemoryBank, greedy_coreset, nearest_distance


def reference_kcenter(x: np.ndarray, k: int, start: int) -> np.ndarray:
    """Plain greedy k-center: add the row farthest from the chosen ones (lowest index on ties)."""
    x = x.astype(np.float64)
    sel = [start]
    dist = ((x - x[start]) ** 2).sum(1)
    for _ in range(1, k):
        i = int(np.argmax(dist))   # numpy: the first maximum
        sel.append(i)
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
    return np.array(sel)


def reference_start(n: int, seed: int, dims: int | None = None, proj: int | None = None
                    ) -> tuple[int, torch.Tensor | None]:
    """The random projection and first centre that greedy_coreset draws from its seed."""
    gen = torch.Generator().manual_seed(seed)
    p = None
    if proj is not None:
        p = torch.randn(dims, proj, generator=gen) / np.sqrt(proj)
    return int(torch.randint(n, (1,), generator=gen).item()), p


def clustered(n: int, dims: int, seed: int, clusters: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(clusters, dims, generator=g)
    scale = torch.rand(clusters, 1, generator=g) + 0.2
    lab = torch.randint(clusters, (n,), generator=g)
    return centres[lab] + scale[lab] * torch.randn(n, dims, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_is_exactly_greedy_k_center_with_ties(seed: int) -> None:
    # integer coordinates: every distance is exact in float32, so ties are real ties; 64
    # distinct points and 90 centres: the last ones are duplicates at distance 0
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (500, 3), generator=g).float()
    got = greedy_coreset(x, 90, seed=seed, projection_dim=None, rotate=False)
    start, _ = reference_start(500, seed)
    assert np.array_equal(got.numpy(), reference_kcenter(x.numpy(), 90, start))


@pytest.mark.parametrize("n,k", [(3000, 150), (1200, 600)])
def test_coreset_equals_reference_on_clustered_data(n: int, k: int) -> None:
    # (1200, 600): rows move often enough that the pool is compacted several times
    x = clustered(n, 24, seed=n)
    got = greedy_coreset(x, k, seed=4, projection_dim=None)
    start, _ = reference_start(n, 4)
    assert np.array_equal(got.numpy(), reference_kcenter(x.numpy(), k, start))


def test_coreset_with_projection_equals_reference_on_projected_rows() -> None:
    x = clustered(2500, 40, seed=7)
    got = greedy_coreset(x, 200, seed=9, projection_dim=16)
    start, p = reference_start(2500, 9, dims=40, proj=16)
    assert np.array_equal(got.numpy(), reference_kcenter((x @ p).numpy(), 200, start))


def test_coreset_does_not_depend_on_thread_count() -> None:
    x = clustered(6000, 48, seed=11)
    threads, nb_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            out.append(greedy_coreset(x, 300, seed=5, projection_dim=32))
            out.append(greedy_coreset(x, 300, seed=5, projection_dim=32, presample=3.0))
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(nb_threads)
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


def test_coreset_seed_determinism() -> None:
    x = clustered(3000, 20, seed=12)
    a = greedy_coreset(x, 100, seed=3)
    assert torch.equal(a, greedy_coreset(x, 100, seed=3))
    assert not torch.equal(a, greedy_coreset(x, 100, seed=4))


def test_two_stage_coreset_returns_distinct_rows_of_the_input() -> None:
    x = clustered(5000, 16, seed=13, clusters=6)
    idx = greedy_coreset(x, 120, seed=1, presample=4.0)
    assert idx.shape == (120,) and len(set(idx.tolist())) == 120
    assert int(idx.min()) >= 0 and int(idx.max()) < 5000
    assert torch.equal(idx, greedy_coreset(x, 120, seed=1, presample=4.0))
    # the greedy step runs on the subset: its radius is close to the full selection's
    full = greedy_coreset(x, 120, seed=1)
    radius = [float(nearest_distance(x, x[i]).max()) for i in (idx, full)]
    assert radius[0] < 2.0 * radius[1]
    with pytest.raises(ValueError, match="presample"):
        greedy_coreset(x, 10, presample=0.5)


@pytest.mark.parametrize("chunk,bank_chunk", [(64, 50), (1000, 8192), (7, 3)])
def test_nearest_distance_chunks_match_brute_force(chunk: int, bank_chunk: int) -> None:
    g = torch.Generator().manual_seed(14)
    q = torch.randn(300, 16, generator=g)
    b = torch.randn(230, 16, generator=g)
    ref = torch.cdist(q.double(), b.double()).min(1).values
    got = nearest_distance(q, b, chunk=chunk, bank_chunk=bank_chunk)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4"])
def test_bank_search_matches_brute_force_on_its_entries(dtype: str) -> None:
    g = torch.Generator().manual_seed(15)
    normal = torch.randn(4000, 20, generator=g) * torch.linspace(0.2, 2.0, 20)
    q = torch.randn(500, 20, generator=g)
    bank = MemoryBank(fraction=0.1, max_entries=None, min_entries=0, dtype=dtype,
                      bank_chunk=96).fit(normal)
    entries = bank.bank
    ref = torch.cdist(q.double(), entries.double()).min(1).values
    got = bank.score(q)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)
    # between searches the bank holds only its stored form and a float32 norm per entry
    held = sum(v.numel() * v.element_size() for v in vars(bank).values()
               if isinstance(v, torch.Tensor))
    assert held + bank.nbytes == bank.nbytes + 4 * bank.entries
    again = MemoryBank(bank_chunk=96)
    again.load_state_dict(bank.state_dict())
    assert torch.equal(again.score(q), got)


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


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4"])
def test_exported_search_in_blocks_matches_the_bank(dtype):
    """`BankSearch` (the ONNX export's search) over the bank in blocks, here of 7 entries
    with a last short block, gives the bank's own nearest-neighbour distances; and in one
    block the same."""
    from cmad.model.bank import BankSearch

    g = torch.Generator().manual_seed(5)
    bank = MemoryBank(fraction=0.5, min_entries=1, dtype=dtype).fit(torch.randn(100, 12, generator=g))
    assert bank.size % 7
    q = torch.randn(40, 12, generator=g)
    ref = bank.score(q)
    for block in (7, 1024):
        got = BankSearch(bank, block=block)(q)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), block
    assert ref.std() > 0


def _brute_scale(entries: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(entries.double(), entries.double())
    d.fill_diagonal_(float("inf"))
    near = d.topk(k, dim=1, largest=False).values.mean(1)
    return (near / near.median()).clamp_min(0.25)


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_density_scaled_search_matches_brute_force(dtype: str) -> None:
    """With `density_k`, a query's score is its distance to the nearest entry over that
    entry's local scale (mean distance to its k nearest other entries / the median of that
    mean), however the bank is split into blocks, saved and loaded, or exported."""
    from cmad.model.bank import BankSearch

    g = torch.Generator().manual_seed(21)
    # a dense cluster and a sparse spread: the entries' local scales differ
    normal = torch.cat([torch.randn(3000, 8, generator=g) * 0.3,
                        torch.randn(300, 8, generator=g) * 3.0])
    q = torch.randn(400, 8, generator=g) * 2.0
    bank = MemoryBank(fraction=0.05, max_entries=None, min_entries=0, dtype=dtype,
                      bank_chunk=37, density_k=5).fit(normal)
    entries = bank.bank
    scale = _brute_scale(entries, 5)
    assert torch.allclose(bank.stored["scale"].double(), scale, rtol=1e-4, atol=1e-5)
    assert scale.max() > 1.5 * scale.min()  # the test has different scales to find
    d = torch.cdist(q.double(), entries.double())
    nearest = d.argmin(1)
    ref = d.min(1).values / scale[nearest]
    got = bank.score(q)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)
    # not the plain distance
    plain = MemoryBank(fraction=0.05, max_entries=None, min_entries=0, dtype=dtype).fit(normal)
    assert not torch.allclose(plain.score(q), got, rtol=1e-2)
    # one float per entry more, kept with the model
    assert bank.nbytes == plain.nbytes + 4 * bank.entries
    again = MemoryBank(bank_chunk=1000)
    again.load_state_dict(bank.state_dict())
    assert torch.allclose(again.score(q), got, rtol=1e-6, atol=1e-6)
    for block in (7, 1024):
        assert torch.allclose(BankSearch(bank, block=block)(q), got, rtol=1e-5, atol=1e-5)
    sd = bank.state_dict()
    sd["scale"] = sd["scale"][:-1]
    with pytest.raises(KeyError, match="scale"):
        MemoryBank().load_state_dict(sd)
    with pytest.raises(ValueError, match="density_k"):
        MemoryBank(density_k=0)


def test_density_scale_of_tiny_banks() -> None:
    one = MemoryBank(fraction=1.0, min_entries=0, density_k=16).fit(torch.randn(1, 4))
    assert one.stored["scale"].tolist() == [1.0]
    few = MemoryBank(fraction=1.0, min_entries=0, density_k=16).fit(torch.randn(3, 4))
    assert few.stored["scale"].shape == (3,) and torch.isfinite(few.score(torch.randn(5, 4))).all()
