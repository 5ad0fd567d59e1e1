"""FPFH on the organized grid: normals, open3d's conventions, invariances, pooling."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cmad
from cmad.errors import ConfigError
from cmad.features import xyz as X


def _camera_rays(size: int, f: float) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    return (u + 0.5 - size / 2) / f, (v + 0.5 - size / 2) / f


def _object_cloud(
    size: int = 64, seed: int = 0, f: float = 800.0, z0: float = 0.4, radius: float = 0.015
) -> tuple[np.ndarray, np.ndarray]:
    """A bumpy dome (about 1 mm between sampled points at step 2) seen by a pinhole camera."""
    rng = np.random.default_rng(seed)
    a, b = _camera_rays(size, f)
    ph = rng.uniform(0, 2 * np.pi, 2)

    def height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r2 = (x * x + y * y) / radius**2
        bump = 0.001 * np.sin(x / 0.003 + ph[0]) * np.cos(y / 0.004 + ph[1])
        return np.where(r2 < 1, 0.006 * (1 - r2) + bump * (1 - r2), 0.0)

    z = np.full((size, size), z0)
    for _ in range(30):
        z = z0 - height(a * z, b * z)
    fg = (a * z) ** 2 + (b * z) ** 2 < radius**2
    fg &= rng.random(fg.shape) > 0.02
    z = z + rng.normal(0.0, 2e-5, z.shape)
    xyz = np.stack([a * z, b * z, z], -1).astype(np.float32)
    xyz[~fg] = 0
    return xyz, fg


CFG = X.FPFHConfig(threads=2)


@pytest.fixture(scope="module")
def cloud() -> tuple[np.ndarray, np.ndarray]:
    return _object_cloud()


@pytest.fixture(scope="module")
def features(cloud):
    xyz, fg = cloud
    normals = X.compute_normals(xyz, fg, CFG)
    return normals, X.compute_fpfh(xyz, fg, normals, CFG)


# ----------------------------------------------------------------------------- normals


def test_smallest_eigvec_matches_numpy():
    rng = np.random.default_rng(0)
    mats = [rng.normal(size=(3, 3)) for _ in range(200)]
    mats = [m @ m.T for m in mats]
    mats += [np.diag([3.0, 1.0, 2.0]), np.diag([1e-9, 1.0, 1.0]), np.ones((3, 3))]
    # a near-planar covariance, as on a smooth surface
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    mats.append(basis @ np.diag([1.0, 0.8, 1e-7]) @ basis.T)
    for m in mats:
        got = np.array(X._smallest_eigvec(m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2]))
        w, v = np.linalg.eigh(m)
        assert abs(np.linalg.norm(got) - 1.0) < 1e-9
        assert abs(got @ m @ got - w[0]) < 1e-9 * w[-1]  # an eigenvector of the smallest
        if w[1] - w[0] > 1e-3 * w[-1]:  # unique up to sign
            assert abs(abs(got @ v[:, 0]) - 1.0) < 1e-6, (m, got, v[:, 0])


def test_plane_normals_face_camera_and_are_perpendicular():
    size, f = 48, 800.0
    a, b = _camera_rays(size, f)
    n_true = np.array([0.3, -0.2, -1.0])
    n_true /= np.linalg.norm(n_true)
    p0 = np.array([0.0, 0.0, 0.4])
    # ray t * (a, b, 1) meets the plane n.(p - p0) = 0
    t = (n_true @ p0) / (n_true[0] * a + n_true[1] * b + n_true[2])
    xyz = np.stack([a * t, b * t, t], -1).astype(np.float32)
    fg = np.ones((size, size), bool)
    normals = X.compute_normals(xyz, fg, CFG)
    pts, ok = X.sample_grid(xyz, fg, CFG.step)
    n = normals[ok]
    assert ok.sum() == (size // 2) ** 2
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-9)
    assert np.all((n * pts[ok]).sum(axis=1) < 0)  # toward the camera at the origin
    assert np.abs(n @ n_true).min() > 1 - 1e-4
    assert np.all(n @ n_true > 0)  # n_true was chosen facing the camera


def test_sphere_normals_match_analytic():
    size, f, radius = 64, 800.0, 0.03
    c = np.array([0.0, 0.0, 0.4])
    a, b = _camera_rays(size, f)
    d = np.stack([a, b, np.ones_like(a)], -1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    # nearest intersection of each ray with the sphere (the visible cap)
    dc = d @ c
    disc = dc**2 - (c @ c - radius**2)
    fg = disc > 0
    t = dc - np.sqrt(np.where(fg, disc, 0.0))
    xyz = (d * t[..., None]).astype(np.float32)
    xyz[~fg] = 0
    normals = X.compute_normals(xyz, fg, CFG)
    pts, ok = X.sample_grid(xyz, fg, CFG.step)
    analytic = (pts[ok] - c) / radius
    cos = (normals[ok] * analytic).sum(axis=1)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(angle) < 0.5
    assert np.percentile(angle, 95) < 3.0


def test_isolated_points_get_the_viewing_direction():
    xyz = np.zeros((16, 16, 3), np.float32)
    fg = np.zeros((16, 16), bool)
    xyz[4, 4] = (0.01, 0.0, 0.5)
    fg[4, 4] = True
    normals = X.compute_normals(xyz, fg, CFG)
    p = xyz[4, 4].astype(np.float64)
    np.testing.assert_allclose(normals[2, 2], -p / np.linalg.norm(p), atol=1e-6)
    feat = X.compute_fpfh(xyz, fg, normals, CFG)
    assert not feat.any()  # no neighbours, no feature


# ----------------------------------------------------------------------------- pair features


def _open3d_pair_features(p1, n1, p2, n2):
    """A plain transcription of open3d's ComputePairFeatures (theta, alpha, phi)."""
    dp = p2 - p1
    dist = np.linalg.norm(dp)
    if dist == 0:
        return 0.0, 0.0, 0.0
    a1, a2 = n1 @ dp / dist, n2 @ dp / dist
    if math.acos(abs(a1)) > math.acos(abs(a2)):
        n1, n2, dp, phi = n2, n1, -dp, -a2
    else:
        phi = a1
    v = np.cross(dp, n1)
    if np.linalg.norm(v) == 0:
        return 0.0, 0.0, 0.0
    v /= np.linalg.norm(v)
    w = np.cross(n1, v)
    return math.atan2(w @ n2, n1 @ n2), v @ n2, phi


def _open3d_bins(f):
    b0 = math.floor(11 * (f[0] + math.pi) / (2 * math.pi))
    b1 = math.floor(11 * (f[1] + 1.0) * 0.5)
    b2 = math.floor(11 * (f[2] + 1.0) * 0.5)
    return min(max(b0, 0), 10), min(max(b1, 0), 10) + 11, min(max(b2, 0), 10) + 22


def test_pair_bins_follow_open3d():
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(3000):
        p1, p2 = rng.normal(size=3) * 0.003, rng.normal(size=3) * 0.003
        n1, n2 = rng.normal(size=3), rng.normal(size=3)
        cases.append((p1, n1 / np.linalg.norm(n1), p2, n2 / np.linalg.norm(n2)))
    z = np.array([0.0, 0.0, 1.0])
    cases.append((np.zeros(3), z, np.zeros(3), z))  # coincident points
    cases.append((np.zeros(3), z, np.array([0.0, 0.0, 0.002]), z))  # line along the normal
    cases.append((np.zeros(3), z, np.array([0.002, 0.0, 0.0]), z))  # plane: tie at 0
    for p1, n1, p2, n2 in cases:
        got = X._pair_bins(*p1, *n1, *p2, *n2)[:3]
        assert got == _open3d_bins(_open3d_pair_features(p1, n1, p2, n2))
        # the vectorised block agrees with the scalar function
        m = 1
        buf = [np.array([v]) for v in (*(p2 - p1), *n2)]
        outs = [np.zeros(1, np.int32) for _ in range(4)]
        ty, tx = np.zeros(1), np.zeros(1)
        X._pair_block(m, *n1, *buf, *outs, ty, tx)
        if not outs[3][0] & 1:
            assert (outs[0][0], outs[1][0], outs[2][0]) == got


def test_theta_bin_is_exact_near_bin_edges():
    rng = np.random.default_rng(2)
    edges = -math.pi + 2 * math.pi * np.arange(12) / 11
    ang = np.concatenate([rng.uniform(-math.pi, math.pi, 5000), edges, edges + 1e-12,
                          edges - 1e-12, [math.pi, -math.pi]])
    scale = rng.uniform(0.1, 10, ang.size)
    for t, s in zip(ang, scale):
        y, x = s * math.sin(t), s * math.cos(t)
        want = min(max(math.floor(11 * (math.atan2(y, x) + math.pi) / (2 * math.pi)), 0), 10)
        assert X._theta_bin(y, x) == want
    assert X._theta_bin(0.0, -1.0) == 10 and X._theta_bin(-0.0, -1.0) == 0


# ----------------------------------------------------------------------------- FPFH


def test_blocks_sum_to_200_where_points_have_neighbours(cloud, features):
    xyz, fg = cloud
    _, feat = features
    _, ok = X.sample_grid(xyz, fg, CFG.step)
    blocks = feat.reshape(*feat.shape[:2], 3, 11).sum(-1)
    has = blocks[..., 0] > 0
    assert has.sum() > 0.95 * ok.sum()
    assert not feat[~ok].any()
    # open3d: the weighted neighbour sum renormalised to 100 plus the own SPFH (100)
    np.testing.assert_allclose(blocks[has], 200.0, atol=1e-3)
    assert (feat >= 0).all()


def test_window_covers_the_radius(cloud, features):
    """Neighbour counts on the grid equal a global radius search (scipy's KD-tree)."""
    from scipy.spatial import cKDTree

    xyz, fg = cloud
    normals, _ = features
    pts, ok = X.sample_grid(xyz, fg, CFG.step)
    _, nnb = X.grid_fpfh(pts, ok, normals, CFG)
    p = pts[ok]
    counts = cKDTree(p).query_ball_point(p, CFG.feature_radius, return_length=True) - 1
    assert np.mean(counts) > 30
    np.testing.assert_array_equal(nnb[ok], counts)


def test_rigid_motion_leaves_fpfh_unchanged(cloud, features):
    xyz, fg = cloud
    normals, feat = features
    pts, ok = X.sample_grid(xyz, fg, CFG.step)
    rng = np.random.default_rng(3)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    moved = pts @ rot.T + np.array([0.05, -0.02, 0.1])
    moved[~ok] = 0
    big = X.FPFHConfig(window=max(ok.shape), threads=2)  # the window covers every point
    feat_moved, _ = X.grid_fpfh(moved, ok, normals @ rot.T, big)
    diff = np.abs(feat_moved - feat)[ok].max(axis=1)
    # rounding may move a pair across a bin edge at a few points, nothing more
    assert np.mean(diff < 1e-3) > 0.98
    assert np.abs(feat_moved - feat)[ok].mean() < 0.05


def test_rotation_about_the_optical_axis_leaves_fpfh_unchanged(cloud, features):
    """The full pipeline (normals included) on a cloud rotated about the camera's z axis."""
    xyz, fg = cloud
    _, feat = features
    c, s = math.cos(0.7), math.sin(0.7)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    xyz_r = (xyz.astype(np.float64) @ rot.T).astype(np.float32)
    normals_r = X.compute_normals(xyz_r, fg, CFG)
    feat_r = X.compute_fpfh(xyz_r, fg, normals_r, CFG)
    _, ok = X.sample_grid(xyz, fg, CFG.step)
    diff = np.abs(feat_r - feat)[ok].max(axis=1)
    assert np.mean(diff < 1e-2) > 0.95
    assert np.abs(feat_r - feat)[ok].mean() < 0.05


def test_masked_out_points_take_no_part(cloud, features):
    xyz, fg = cloud
    normals, feat = features
    rng = np.random.default_rng(4)
    junk = xyz.copy()
    junk[~fg] = rng.normal(0.4, 0.002, size=(int((~fg).sum()), 3)).astype(np.float32)
    junk[::7, ::3][~fg[::7, ::3]] = np.nan
    assert np.isnan(junk).any()
    normals_j = X.compute_normals(junk, fg, CFG)
    np.testing.assert_array_equal(normals_j, normals)
    np.testing.assert_array_equal(X.compute_fpfh(junk, fg, normals_j, CFG), feat)
    # NaN inside the foreground counts as invalid, not as a point
    nan_fg = xyz.copy()
    ys, xs = np.nonzero(fg[::2, ::2])
    nan_fg[2 * ys[0], 2 * xs[0]] = np.nan
    fg_less = fg.copy()
    fg_less[2 * ys[0], 2 * xs[0]] = False
    a = X.compute_fpfh(nan_fg, fg, X.compute_normals(nan_fg, fg, CFG), CFG)
    b = X.compute_fpfh(xyz, fg_less, X.compute_normals(xyz, fg_less, CFG), CFG)
    np.testing.assert_array_equal(a, b)


def test_row_phases_never_write_the_same_row_at_once():
    for rows in (7, 32, 112, 150):
        for win in (1, 3, 8, 16):
            for threads in (1, 2, 3, 8):
                phases = X._Rows(rows, win, threads).pair_phases()
                handled = sorted(r for phase in phases for r in phase if r[0] < r[1])
                assert [a for a, _ in handled] == [0] + [b for _, b in handled[:-1]]
                assert handled[-1][1] == rows
                for phase in phases:
                    written = [set(range(a, min(b + win, rows))) for a, b in phase if a < b]
                    for i, w in enumerate(written):
                        for other in written[i + 1 :]:
                            assert not w & other, (rows, win, threads, phase)


def test_deterministic_and_thread_count_independent(cloud, features):
    xyz, fg = cloud
    normals, feat = features
    np.testing.assert_array_equal(X.compute_fpfh(xyz, fg, normals, CFG), feat)
    for threads in (1, 3, 4):
        cfg = X.FPFHConfig(threads=threads)
        got = X.compute_normals(xyz, fg, cfg)
        assert np.array_equal(got, normals), threads  # bit for bit, not merely close
        assert np.array_equal(X.compute_fpfh(xyz, fg, got, cfg), feat), threads


_THREADS_SCRIPT = """
import os, sys
import numpy as np
import numba, torch
n = int(sys.argv[1])
if n == 1 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
torch.set_num_threads(n)
sys.path.insert(0, sys.argv[3])
from test_fpfh import _object_cloud
from cmad.features import xyz as X
cfg = X.FPFHConfig(threads=None if n == 1 else n)
assert X._threads(cfg) == n
xyz, fg = _object_cloud(size=160, seed=5)
pts, ok = X.sample_grid(xyz, fg, cfg.step)
normals = X.grid_normals(pts, ok, cfg)
feat = X.grid_fpfh(pts, ok, normals, cfg)[0]
pooled = X.FPFHExtractor(cfg).extract(xyz, fg)[0]
np.savez(sys.argv[2], normals=normals, feat=feat, pooled=pooled)
"""


def test_bit_identical_with_one_and_two_threads_in_subprocesses(tmp_path):
    """As `cmad --threads 1` and `--threads 2` run it: fresh processes, numba and torch set to
    1 or 2 threads, the FPFH thread count from the CPU affinity (1) or given (2)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(cmad.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = {}
    for n in (1, 2):
        path = tmp_path / f"t{n}.npz"
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(n), str(path),
                        str(Path(__file__).parent)], check=True, env=env, timeout=600)
        out[n] = np.load(path)
    assert out[1]["normals"].any() and out[1]["feat"].any()
    for key in ("normals", "feat", "pooled"):
        assert np.array_equal(out[1][key], out[2][key]), key


# ----------------------------------------------------------------------------- extractor


def test_extractor_shapes_pooling_and_validity(cloud, features):
    xyz, fg = cloud
    _, feat = features
    ext = X.FPFHExtractor(X.FPFHConfig(grid=(8, 8), threads=2, min_points=4))
    pooled, valid = ext.extract(xyz, fg)
    assert ext.dim == 33
    assert pooled.shape == (33, 8, 8) and pooled.dtype == np.float32
    assert valid.shape == (8, 8) and valid.dtype == bool
    assert 0 < valid.sum() < 64
    assert not pooled[:, ~valid].any()
    # one cell by hand: 64 / 8 = 8 pixels = 4 sampled points per side
    cy, cx = np.argwhere(valid)[len(np.argwhere(valid)) // 2]
    cell = feat[4 * cy : 4 * cy + 4, 4 * cx : 4 * cx + 4].reshape(-1, 33)
    cell = cell[cell[:, :11].sum(1) > 0]
    np.testing.assert_allclose(pooled[:, cy, cx], cell.mean(0), rtol=1e-5, atol=1e-4)
    # a cloud with no foreground gives no valid patch
    empty = ext.extract(np.zeros_like(xyz), np.zeros_like(fg))
    assert not empty[1].any() and not empty[0].any()
    batch_f, batch_v = ext.extract_batch([(xyz, fg), (xyz, fg)])
    assert batch_f.shape == (2, 33, 8, 8) and batch_v.shape == (2, 8, 8)
    np.testing.assert_array_equal(batch_f[1], pooled)


def test_config_round_trip_and_errors():
    cfg = X.FPFHConfig(step=1, window=6, grid=[14, 14])
    assert cfg.grid == (14, 14)
    assert X.FPFHConfig(**cfg.to_dict()) == cfg
    ident = X.FPFHExtractor(cfg).identity()
    assert ident["name"] == "fpfh" and ident["feature_radius"] == cfg.feature_radius
    assert X.FPFHExtractor(X.FPFHConfig(step=1, window=6, grid=(14, 14), threads=1)).identity() == ident
    for bad in ({"step": 0}, {"feature_radius": 0.0}, {"window": 0}, {"backend": "pcl"},
                {"threads": 0}, {"min_points": 0}):
        with pytest.raises(ConfigError):
            X.FPFHConfig(**bad)
    with pytest.raises(ValueError):
        X.FPFHExtractor(cfg).extract(np.zeros((8, 6, 3), np.float32), np.zeros((8, 6), bool))


# ----------------------------------------------------------------------------- open3d


def test_matches_open3d_point_for_point_and_per_patch(cloud, features):
    pytest.importorskip("open3d", exc_type=ImportError)  # missing libusb-1.0 too
    from cmad.features._fpfh_open3d import fpfh_open3d

    xyz, fg = cloud
    normals, feat = features
    ref = fpfh_open3d(xyz, fg, normals, CFG)
    _, ok = X.sample_grid(xyz, fg, CFG.step)
    a, b = feat[ok], ref[ok]
    per_point = np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b) if u.any()])
    assert per_point.min() > 0.99
    assert np.mean(np.abs(a - b).max(axis=1) < 1e-3) > 0.999
    grid = X.FPFHConfig(grid=(16, 16), threads=2)
    pa, va = X.pool_patches(feat, xyz.shape[0], grid)
    pb, vb = X.pool_patches(ref, xyz.shape[0], grid)
    np.testing.assert_array_equal(va, vb)
    for k in range(33):
        if pa[k, va].std() > 0:
            assert np.corrcoef(pa[k, va], pb[k, va])[0, 1] > 0.99
    # the extractor's open3d backend gives the same patches
    o3d_ext = X.FPFHExtractor(grid, backend="open3d")
    pc, vc = o3d_ext.extract(xyz, fg)
    np.testing.assert_array_equal(vc, vb)
    np.testing.assert_allclose(pc, pb, atol=1e-4)
