"""FPFH (Rusu et al. 2009, 33 bins) on the organized point cloud, as fused numba kernels.

The cloud stays on its pixel grid: the neighbours of a point are the valid foreground
points inside a square grid window around it that also lie within a metric radius. When
the window covers the radius this is exactly open3d's KD-tree radius search, and the
descriptor follows open3d's `ComputeFPFHFeature` bin for bin:

- pair features (theta, alpha, phi) with open3d's source/target swap rule (the point whose
  normal makes the smaller angle with the connecting line is the source);
- hard floor binning into 11 bins each, stored in the order theta (bins 0-10),
  alpha = v.n_t (11-21), phi = n_s.d (22-32); degenerate pairs land in the middle bins;
- SPFH: each 11-bin block scaled by 100 / number of neighbours;
- FPFH: the 1 / squared-distance weighted sum of the neighbours' SPFH, each block
  renormalised to 100, plus the point's own SPFH (so every block of a point with
  neighbours sums to 200).

Normals come from PCA over the neighbours within `normal_radius` (closed-form 3x3
eigen-solver), oriented toward the camera at the origin. Per-point features are pooled into
the patch grid (mean over the cell's points that have neighbours).

Speed: every pair is computed once and added to both of its points; the pair features of a
point's neighbours are computed in a branch-free loop that LLVM vectorises. Threads run the
serial (nogil) kernels on row chunks in two phases, even chunks and then odd chunks, so
that no two threads write the same point. The chunks depend on the grid and the window, not
on the thread count, so every floating-point sum adds its terms in one fixed order and the
features are bit-identical whatever the number of threads. A Python thread pool is used rather than numba's
`prange`: numba's OpenMP layer spin-waits at every barrier, which made a cloud 5x slower
than one thread whenever the CPUs were shared with other processes.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
from numba import njit

from cmad.configs import DEFAULT_SIZE
from cmad.errors import ConfigError

log = logging.getLogger(__name__)

DIM = 33
# Bump when the descriptor's code changes its values: caches and saved models are invalidated.
CODE_VERSION = "2"
BACKENDS = ("numba", "open3d")


@dataclass(frozen=True)
class FPFHConfig:
    """Settings of the 3D descriptor.

    step: take every `step`-th pixel of the working-resolution cloud in both directions.
    normal_radius: metres; PCA normals use the neighbours within this radius.
    feature_radius: metres; FPFH neighbours. The default 6 mm gives about 100 neighbours
        per point at step 2 when a 224-pixel image spans about 11 cm (0.5 mm per pixel),
        as in MVTec 3D-AD.
    window: grid half-width (in sampled pixels) searched for neighbours; None derives it
        per cloud from the point spacing so that it covers the radius.
    max_window: upper bound of the derived window.
    grid: (h, w) patch grid the features are pooled into (the default: the stride-8 grid
        of the default working size; `DetectorConfig` and `FeatureExtractor` set it from
        their size).
    min_points: a patch is valid when at least this many of its sampled points have
        neighbours.
    threads: worker threads (None: the CPUs this process may use).
    backend: "numba" (this module) or "open3d" (reference, needs the [open3d] extra).
    """

    step: int = 2
    normal_radius: float = 0.0035
    feature_radius: float = 0.006
    window: int | None = None
    max_window: int = 16
    grid: tuple[int, int] = (DEFAULT_SIZE // 8, DEFAULT_SIZE // 8)
    min_points: int = 4
    threads: int | None = None
    backend: str = "numba"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if self.step < 1:
            raise ConfigError(f"FPFH step must be >= 1, got {self.step}")
        if not (self.normal_radius > 0 and self.feature_radius > 0):
            raise ConfigError(
                f"FPFH radii must be positive, got normal_radius={self.normal_radius}, "
                f"feature_radius={self.feature_radius}"
            )
        if self.window is not None and self.window < 1:
            raise ConfigError(f"FPFH window must be >= 1 or None, got {self.window}")
        if self.max_window < 1:
            raise ConfigError(f"FPFH max_window must be >= 1, got {self.max_window}")
        if min(self.grid) < 1:
            raise ConfigError(f"FPFH grid must be positive, got {self.grid}")
        if self.min_points < 1:
            raise ConfigError(f"FPFH min_points must be >= 1, got {self.min_points}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"FPFH threads must be >= 1 or None, got {self.threads}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"FPFH backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


# --------------------------------------------------------------------------- numba kernels
# Each *_accumulate kernel handles the pairs whose first point lies in rows [y0, y1) and
# writes to rows [y0, y1 + win); each *_finish kernel handles rows [y0, y1) alone. The row
# range comes last so that `_Rows` can append it.


@njit(cache=True, nogil=True, fastmath=False)
def _smallest_eigvec(a00, a01, a02, a11, a12, a22):
    """Unit eigenvector of the smallest eigenvalue of a symmetric 3x3 matrix (closed form).

    Eigenvalues by the trigonometric method on the shifted, scaled matrix; the eigenvector
    is the longest cross product of two rows of (A - lambda I).
    """
    scale = max(abs(a00), abs(a01), abs(a02), abs(a11), abs(a12), abs(a22))
    if scale == 0.0:
        return 0.0, 0.0, 0.0
    a00 /= scale
    a01 /= scale
    a02 /= scale
    a11 /= scale
    a12 /= scale
    a22 /= scale
    off = a01 * a01 + a02 * a02 + a12 * a12
    if off == 0.0:
        if a00 <= a11 and a00 <= a22:
            return 1.0, 0.0, 0.0
        if a11 <= a22:
            return 0.0, 1.0, 0.0
        return 0.0, 0.0, 1.0
    q = (a00 + a11 + a22) / 3.0
    b00 = a00 - q
    b11 = a11 - q
    b22 = a22 - q
    p = math.sqrt((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * off) / 6.0)
    c00 = b11 * b22 - a12 * a12
    c01 = a01 * b22 - a12 * a02
    c02 = a01 * a12 - b11 * a02
    half_det = (b00 * c00 - a01 * c01 + a02 * c02) / (p * p * p) * 0.5
    half_det = min(max(half_det, -1.0), 1.0)
    angle = math.acos(half_det) / 3.0
    lam = q + p * 2.0 * math.cos(angle + 2.0943951023931957)
    r00 = a00 - lam
    r11 = a11 - lam
    r22 = a22 - lam
    # rows: (r00, a01, a02), (a01, r11, a12), (a02, a12, r22)
    x0 = a01 * a12 - a02 * r11
    y0 = a02 * a01 - r00 * a12
    z0 = r00 * r11 - a01 * a01
    x1 = a01 * r22 - a02 * a12
    y1 = a02 * a02 - r00 * r22
    z1 = r00 * a12 - a01 * a02
    x2 = r11 * r22 - a12 * a12
    y2 = a12 * a02 - a01 * r22
    z2 = a01 * a12 - r11 * a02
    d0 = x0 * x0 + y0 * y0 + z0 * z0
    d1 = x1 * x1 + y1 * y1 + z1 * z1
    d2 = x2 * x2 + y2 * y2 + z2 * z2
    if max(d0, d1, d2) == 0.0:
        return 0.0, 0.0, 0.0
    if d0 >= d1 and d0 >= d2:
        s = math.sqrt(d0)
        return x0 / s, y0 / s, z0 / s
    if d1 >= d2:
        s = math.sqrt(d1)
        return x1 / s, y1 / s, z1 / s
    s = math.sqrt(d2)
    return x2 / s, y2 / s, z2 / s


@njit(cache=True, nogil=True, fastmath=False)
def _normals_accumulate(pts, valid, r2, win, s1, s2, cnt, y0, y1):
    """Sums of d and d d^T (d = p_j - p_i) over the pairs within the radius.

    Each pair is visited once: p_i gets +d, p_j gets -d, both get d d^T.
    """
    rows, cols = valid.shape
    for y in range(y0, y1):
        for x in range(cols):
            if not valid[y, x]:
                continue
            px = pts[y, x, 0]
            py = pts[y, x, 1]
            pz = pts[y, x, 2]
            for dy in range(win + 1):
                yy = y + dy
                if yy >= rows:
                    break
                x0 = x + 1 if dy == 0 else max(x - win, 0)
                for xx in range(x0, min(x + win + 1, cols)):
                    if not valid[yy, xx]:
                        continue
                    ex = pts[yy, xx, 0] - px
                    ey = pts[yy, xx, 1] - py
                    ez = pts[yy, xx, 2] - pz
                    if ex * ex + ey * ey + ez * ez >= r2:
                        continue
                    exx = ex * ex
                    exy = ex * ey
                    exz = ex * ez
                    eyy = ey * ey
                    eyz = ey * ez
                    ezz = ez * ez
                    s1[y, x, 0] += ex
                    s1[y, x, 1] += ey
                    s1[y, x, 2] += ez
                    s1[yy, xx, 0] -= ex
                    s1[yy, xx, 1] -= ey
                    s1[yy, xx, 2] -= ez
                    s2[y, x, 0] += exx
                    s2[y, x, 1] += exy
                    s2[y, x, 2] += exz
                    s2[y, x, 3] += eyy
                    s2[y, x, 4] += eyz
                    s2[y, x, 5] += ezz
                    s2[yy, xx, 0] += exx
                    s2[yy, xx, 1] += exy
                    s2[yy, xx, 2] += exz
                    s2[yy, xx, 3] += eyy
                    s2[yy, xx, 4] += eyz
                    s2[yy, xx, 5] += ezz
                    cnt[y, x] += 1
                    cnt[yy, xx] += 1


@njit(cache=True, nogil=True, fastmath=False)
def _normals_finish(pts, valid, s1, s2, cnt, normals, y0, y1):
    """Smallest-eigenvalue eigenvector of each covariance, turned toward the origin.

    Points with fewer than 3 points (itself included) in the radius get the viewing
    direction -p / |p|.
    """
    cols = valid.shape[1]
    for y in range(y0, y1):
        for x in range(cols):
            if not valid[y, x]:
                continue
            px = pts[y, x, 0]
            py = pts[y, x, 1]
            pz = pts[y, x, 2]
            n = cnt[y, x] + 1.0
            nx = 0.0
            ny = 0.0
            nz = 0.0
            if n >= 3.0:
                mx = s1[y, x, 0] / n
                my = s1[y, x, 1] / n
                mz = s1[y, x, 2] / n
                nx, ny, nz = _smallest_eigvec(
                    s2[y, x, 0] / n - mx * mx,
                    s2[y, x, 1] / n - mx * my,
                    s2[y, x, 2] / n - mx * mz,
                    s2[y, x, 3] / n - my * my,
                    s2[y, x, 4] / n - my * mz,
                    s2[y, x, 5] / n - mz * mz,
                )
            if nx == 0.0 and ny == 0.0 and nz == 0.0:
                norm = math.sqrt(px * px + py * py + pz * pz)
                if norm > 0.0:
                    nx = -px / norm
                    ny = -py / norm
                    nz = -pz / norm
            elif nx * px + ny * py + nz * pz > 0.0:
                nx = -nx
                ny = -ny
                nz = -nz
            normals[y, x, 0] = nx
            normals[y, x, 1] = ny
            normals[y, x, 2] = nz


@njit(cache=True, nogil=True, fastmath=False)
def _theta_bin(y, x):
    """floor(11 (atan2(y, x) + pi) / (2 pi)), clamped to 0..10, mostly without atan2.

    A polynomial arctangent (error < 2e-5 rad) places the angle; only when it falls within
    1e-3 bin widths of a bin edge is the exact `atan2` evaluated, so the bin is always the
    one open3d's formula gives.
    """
    ax = abs(x)
    ay = abs(y)
    hi = max(ax, ay)
    if hi == 0.0:
        t = math.atan2(y, x)
    else:
        a = min(ax, ay) / hi
        s = a * a
        t = ((-0.0464964749 * s + 0.15931422) * s - 0.327622764) * s * a + a
        if ay > ax:
            t = 1.5707963267948966 - t
        if x < 0.0:
            t = math.pi - t
        if y < 0.0:
            t = -t
    u = 11.0 * (t + math.pi) / (2.0 * math.pi)
    b = math.floor(u)
    if u - b < 1e-3 or u - b > 0.999 or hi == 0.0:
        u = 11.0 * (math.atan2(y, x) + math.pi) / (2.0 * math.pi)
        b = math.floor(u)
    return min(max(int(b), 0), 10)


@njit(cache=True, nogil=True, fastmath=False)
def _pair_bins(p1x, p1y, p1z, n1x, n1y, n1z, p2x, p2y, p2z, n2x, n2y, n2z):
    """open3d's ComputePairFeatures followed by its floor binning.

    Returns the three bin indices (offset into the 33-vector) and whether the swap rule was
    undecided (|a1| == |a2|), the one case where the reversed pair gives other bins.
    Degenerate pairs (coincident points, or the line along the source normal) give the
    zero feature, i.e. the middle bins, as in open3d.
    """
    dx = p2x - p1x
    dy = p2y - p1y
    dz = p2z - p1z
    d = math.sqrt(dx * dx + dy * dy + dz * dz)
    if d == 0.0:
        return 5, 16, 27, False
    a1 = (n1x * dx + n1y * dy + n1z * dz) / d
    a2 = (n2x * dx + n2y * dy + n2z * dz) / d
    tie = abs(a1) == abs(a2)
    # acos(|a1|) > acos(|a2|)  <=>  |a1| < |a2|: swap source and target
    if abs(a1) < abs(a2):
        sx, sy, sz = n2x, n2y, n2z
        tx, ty, tz = n1x, n1y, n1z
        dx = -dx
        dy = -dy
        dz = -dz
        phi = -a2
    else:
        sx, sy, sz = n1x, n1y, n1z
        tx, ty, tz = n2x, n2y, n2z
        phi = a1
    vx = dy * sz - dz * sy
    vy = dz * sx - dx * sz
    vz = dx * sy - dy * sx
    vn = math.sqrt(vx * vx + vy * vy + vz * vz)
    if vn == 0.0:
        return 5, 16, 27, tie
    vx /= vn
    vy /= vn
    vz /= vn
    wx = sy * vz - sz * vy
    wy = sz * vx - sx * vz
    wz = sx * vy - sy * vx
    alpha = vx * tx + vy * ty + vz * tz
    b0 = _theta_bin(wx * tx + wy * ty + wz * tz, sx * tx + sy * ty + sz * tz)
    b1 = math.floor(11.0 * (alpha + 1.0) * 0.5)
    b2 = math.floor(11.0 * (phi + 1.0) * 0.5)
    return b0, min(max(b1, 0), 10) + 11, min(max(b2, 0), 10) + 22, tie


@njit(cache=True, nogil=True, fastmath=False)
def _pair_block(m, nx, ny, nz, ex, ey, ez, mx, my, mz, b0, b1, b2, flag, ty, tx):
    """Bins of the pairs (point with normal n) -> (m neighbours at offsets e, normals m).

    The same arithmetic as `_pair_bins`, written without branches so that LLVM vectorises
    it across the neighbours. flag bit 1: theta lies near a bin edge, redo it with `atan2`
    of (ty, tx); bit 2: the swap rule is undecided, the reversed pair needs its own bins.
    """
    for k in range(m):
        dx = ex[k]
        dy = ey[k]
        dz = ez[k]
        qx = mx[k]
        qy = my[k]
        qz = mz[k]
        d = math.sqrt(dx * dx + dy * dy + dz * dz)
        ds = d if d != 0.0 else 1.0
        a1 = (nx * dx + ny * dy + nz * dz) / ds
        a2 = (qx * dx + qy * dy + qz * dz) / ds
        sw = abs(a1) < abs(a2)
        sx = qx if sw else nx
        sy = qy if sw else ny
        sz = qz if sw else nz
        tx_ = nx if sw else qx
        ty_ = ny if sw else qy
        tz_ = nz if sw else qz
        sg = -1.0 if sw else 1.0
        phi = -a2 if sw else a1
        dx *= sg
        dy *= sg
        dz *= sg
        vx = dy * sz - dz * sy
        vy = dz * sx - dx * sz
        vz = dx * sy - dy * sx
        vn = math.sqrt(vx * vx + vy * vy + vz * vz)
        vs = vn if vn != 0.0 else 1.0
        vx /= vs
        vy /= vs
        vz /= vs
        wx = sy * vz - sz * vy
        wy = sz * vx - sx * vz
        wz = sx * vy - sy * vx
        alpha = vx * tx_ + vy * ty_ + vz * tz_
        yv = wx * tx_ + wy * ty_ + wz * tz_
        xv = sx * tx_ + sy * ty_ + sz * tz_
        ax = abs(xv)
        ay = abs(yv)
        hi = max(ax, ay)
        a = min(ax, ay) / (hi if hi > 0.0 else 1.0)
        s = a * a
        t = ((-0.0464964749 * s + 0.15931422) * s - 0.327622764) * s * a + a
        t = 1.5707963267948966 - t if ay > ax else t
        t = math.pi - t if xv < 0.0 else t
        t = -t if yv < 0.0 else t
        u = 11.0 * (t + math.pi) / (2.0 * math.pi)
        fu = math.floor(u)
        fr = u - fu
        degen = (d == 0.0) | (vn == 0.0)
        c0 = min(max(fu, 0.0), 10.0)
        c1 = min(max(math.floor(11.0 * (alpha + 1.0) * 0.5), 0.0), 10.0)
        c2 = min(max(math.floor(11.0 * (phi + 1.0) * 0.5), 0.0), 10.0)
        b0[k] = 5 if degen else np.int32(c0)
        b1[k] = 16 if degen else np.int32(c1) + 11
        b2[k] = 27 if degen else np.int32(c2) + 22
        edge = ((fr < 1e-3) | (fr > 0.999) | (hi == 0.0)) & ~degen
        tie = (abs(a1) == abs(a2)) & (d != 0.0)
        flag[k] = (1 if edge else 0) + (2 if tie else 0)
        ty[k] = yv
        tx[k] = xv


@njit(cache=True, nogil=True, fastmath=False)
def _spfh_accumulate(pts, nrm, valid, r2, win, counts, nnb, y0, y1):
    """Bin counts and neighbour counts of every pair within the radius, for both points."""
    rows, cols = valid.shape
    cap = (win + 1) * (2 * win + 1)
    ex = np.empty(cap)
    ey = np.empty(cap)
    ez = np.empty(cap)
    mx = np.empty(cap)
    my = np.empty(cap)
    mz = np.empty(cap)
    ty = np.empty(cap)
    tx = np.empty(cap)
    jy = np.empty(cap, np.int32)
    jx = np.empty(cap, np.int32)
    b0 = np.empty(cap, np.int32)
    b1 = np.empty(cap, np.int32)
    b2 = np.empty(cap, np.int32)
    flag = np.empty(cap, np.int32)
    for y in range(y0, y1):
        for x in range(cols):
            if not valid[y, x]:
                continue
            px = pts[y, x, 0]
            py = pts[y, x, 1]
            pz = pts[y, x, 2]
            m = 0
            for dy in range(win + 1):
                yy = y + dy
                if yy >= rows:
                    break
                x0 = x + 1 if dy == 0 else max(x - win, 0)
                for xx in range(x0, min(x + win + 1, cols)):
                    if not valid[yy, xx]:
                        continue
                    qx = pts[yy, xx, 0] - px
                    qy = pts[yy, xx, 1] - py
                    qz = pts[yy, xx, 2] - pz
                    if qx * qx + qy * qy + qz * qz >= r2:
                        continue
                    ex[m] = qx
                    ey[m] = qy
                    ez[m] = qz
                    mx[m] = nrm[yy, xx, 0]
                    my[m] = nrm[yy, xx, 1]
                    mz[m] = nrm[yy, xx, 2]
                    jy[m] = yy
                    jx[m] = xx
                    m += 1
            if m == 0:
                continue
            nx = nrm[y, x, 0]
            ny = nrm[y, x, 1]
            nz = nrm[y, x, 2]
            _pair_block(m, nx, ny, nz, ex, ey, ez, mx, my, mz, b0, b1, b2, flag, ty, tx)
            nnb[y, x] += m
            for k in range(m):
                yy = jy[k]
                xx = jx[k]
                c0 = b0[k]
                c1 = b1[k]
                c2 = b2[k]
                f = flag[k]
                if f & 1:
                    u = 11.0 * (math.atan2(ty[k], tx[k]) + math.pi) / (2.0 * math.pi)
                    c0 = min(max(math.floor(u), 0), 10)
                counts[y, x, c0] += 1
                counts[y, x, c1] += 1
                counts[y, x, c2] += 1
                if f & 2:
                    c0, c1, c2, _ = _pair_bins(
                        pts[yy, xx, 0], pts[yy, xx, 1], pts[yy, xx, 2],
                        mx[k], my[k], mz[k], px, py, pz, nx, ny, nz,
                    )
                counts[yy, xx, c0] += 1
                counts[yy, xx, c1] += 1
                counts[yy, xx, c2] += 1
                nnb[yy, xx] += 1


@njit(cache=True, nogil=True, fastmath=False)
def _spfh_finish(counts, nnb, spfh, y0, y1):
    """SPFH: each block of bin counts times 100 / number of neighbours."""
    cols = nnb.shape[1]
    for y in range(y0, y1):
        for x in range(cols):
            if nnb[y, x] > 0:
                inc = 100.0 / nnb[y, x]
                for k in range(33):
                    spfh[y, x, k] = counts[y, x, k] * inc


@njit(cache=True, nogil=True, fastmath=False)
def _fpfh_accumulate(pts, spfh, valid, r2, win, acc, y0, y1):
    """1 / d^2 weighted sums of the neighbours' SPFH, each pair added to both points."""
    rows, cols = valid.shape
    for y in range(y0, y1):
        for x in range(cols):
            if not valid[y, x]:
                continue
            px = pts[y, x, 0]
            py = pts[y, x, 1]
            pz = pts[y, x, 2]
            for dy in range(win + 1):
                yy = y + dy
                if yy >= rows:
                    break
                x0 = x + 1 if dy == 0 else max(x - win, 0)
                for xx in range(x0, min(x + win + 1, cols)):
                    if not valid[yy, xx]:
                        continue
                    ex = pts[yy, xx, 0] - px
                    ey = pts[yy, xx, 1] - py
                    ez = pts[yy, xx, 2] - pz
                    dd = ex * ex + ey * ey + ez * ez
                    if dd >= r2 or dd == 0.0:
                        continue
                    wgt = 1.0 / dd
                    for k in range(33):
                        acc[y, x, k] += spfh[yy, xx, k] * wgt
                        acc[yy, xx, k] += spfh[y, x, k] * wgt


@njit(cache=True, nogil=True, fastmath=False)
def _fpfh_finish(acc, spfh, nnb, out, y0, y1):
    """FPFH: each block of the weighted sum renormalised to 100, plus the own SPFH."""
    cols = nnb.shape[1]
    for y in range(y0, y1):
        for x in range(cols):
            if nnb[y, x] == 0:
                continue
            for blk in range(3):
                s = 0.0
                for k in range(11 * blk, 11 * blk + 11):
                    s += acc[y, x, k]
                scale = 100.0 / s if s != 0.0 else 0.0
                for k in range(11 * blk, 11 * blk + 11):
                    out[y, x, k] = acc[y, x, k] * scale + spfh[y, x, k]


@njit(cache=True, nogil=True, fastmath=False)
def _pool_kernel(feat, ok, step, size, gh, gw):
    """Mean of the per-point features over the points of each patch cell."""
    rows, cols, c = feat.shape
    sums = np.zeros((gh, gw, c))
    cnt = np.zeros((gh, gw), np.int32)
    for y in range(rows):
        cy = (y * step) * gh // size
        for x in range(cols):
            if not ok[y, x]:
                continue
            cx = (x * step) * gw // size
            cnt[cy, cx] += 1
            for k in range(c):
                sums[cy, cx, k] += feat[y, x, k]
    out = np.zeros((c, gh, gw), np.float32)
    for cy in range(gh):
        for cx in range(gw):
            if cnt[cy, cx] > 0:
                for k in range(c):
                    out[k, cy, cx] = sums[cy, cx, k] / cnt[cy, cx]
    return out, cnt


# --------------------------------------------------------------------------- scheduling

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()

# Most row chunks of a grid. The chunks depend on the grid and the window only, never on the
# thread count, so the floating-point sums (normal covariances, FPFH weighted sums) add the
# same terms in the same order whatever the number of threads: the result is bit-identical.
MAX_CHUNKS = 8


def _threads(cfg: FPFHConfig) -> int:
    if cfg.threads is not None:
        return int(cfg.threads)
    from cmad.runtime import cpu_threads

    return cpu_threads()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:  # pipeline stages may extract two batches at once
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(max_workers=workers,
                                                 thread_name_prefix="cmad-fpfh")
        return _POOLS[workers]


class _Rows:
    """Row chunks of a grid and the threads that run kernels on them.

    Chunks are at least `win` rows tall: a pair kernel on a chunk writes into that chunk and
    the next one only, so all even chunks can run at once, and then all odd ones. Within a
    phase every point is written by one chunk alone, in raster order, so each sum is formed
    in an order fixed by the chunks; the chunks do not depend on `threads`, which only says
    how many threads take chunks from the queue.
    """

    def __init__(self, rows: int, win: int, threads: int) -> None:
        n = max(1, min(MAX_CHUNKS, rows // max(win, 1)))
        bounds = np.linspace(0, rows, n + 1).astype(int)
        self.chunks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        self.win = win
        self.threads = max(1, int(threads))

    def pair_phases(self) -> list[list[tuple[int, int]]]:
        """Row ranges of a pair kernel: the ranges of one phase may run at the same time."""
        if len(self.chunks) == 1:
            return [self.chunks]
        return [self.chunks[0::2], self.chunks[1::2]]

    def _map(self, fn: Callable, args: tuple, ranges: list[tuple[int, int]]) -> None:
        todo = [r for r in ranges if r[0] < r[1]]
        workers = min(self.threads, len(todo))
        if workers <= 1:
            for a, b in todo:
                fn(*args, a, b)
            return
        queue = iter(todo)
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    r = next(queue, None)
                if r is None:
                    return
                fn(*args, *r)

        futures = [_pool(workers - 1).submit(work) for _ in range(workers - 1)]
        try:
            work()  # the calling thread takes chunks too
        finally:
            for fut in futures:
                fut.result()

    def each(self, fn: Callable, *args) -> None:
        """A per-point kernel fn(*args, y0, y1) on all rows, one range per thread.

        Each point is computed on its own, so how the rows are split does not matter.
        """
        rows = self.chunks[-1][1]
        bounds = np.linspace(0, rows, min(self.threads, max(rows, 1)) + 1).astype(int)
        self._map(fn, args, list(zip(bounds[:-1].tolist(), bounds[1:].tolist())))

    def pairs(self, fn: Callable, *args) -> None:
        """A pair kernel fn(*args, y0, y1) on every chunk, phase by phase."""
        for ranges in self.pair_phases():
            self._map(fn, args, ranges)


# --------------------------------------------------------------------------- Python API


def sample_grid(xyz: np.ndarray, mask: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Every `step`-th pixel: float64 points (S', S', 3) and their validity (S', S').

    A point is valid when the mask says so and it is finite and not exactly zero.
    """
    xyz = np.asarray(xyz)
    mask = np.asarray(mask)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must be (H, W, 3), got shape {xyz.shape}")
    if mask.shape != xyz.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match xyz shape {xyz.shape}")
    pts = np.ascontiguousarray(xyz[::step, ::step], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = mask[::step, ::step].astype(bool) & np.isfinite(pts).all(axis=2)
        ok &= (pts != 0).any(axis=2)
    pts = np.where(ok[..., None], pts, 0.0)
    return pts, np.ascontiguousarray(ok)


def point_spacing(pts: np.ndarray, ok: np.ndarray, baseline: int = 4) -> float:
    """A low (2nd percentile) distance per grid step between valid points `baseline` apart.

    It is close to the lateral pitch on the nearest surfaces facing the camera, the
    smallest spacing the window must cover. NaN when there are too few pairs.
    """
    dists = []
    for a, b, va, vb in (
        (pts[:, baseline:], pts[:, :-baseline], ok[:, baseline:], ok[:, :-baseline]),
        (pts[baseline:], pts[:-baseline], ok[baseline:], ok[:-baseline]),
    ):
        both = va & vb
        if both.any():
            diff = a[both] - b[both]
            dists.append(np.sqrt((diff * diff).sum(axis=1)))
    if not dists:
        return float("nan")
    d = np.concatenate(dists)
    d = d[d > 0] / baseline
    if d.size < 10:
        return float("nan")
    k = int(0.02 * (d.size - 1))
    return float(np.partition(d, k)[k])


def windows_for(pts: np.ndarray, ok: np.ndarray, cfg: FPFHConfig) -> tuple[int, int]:
    """Grid half-widths (normals, FPFH) that cover `normal_radius` and `feature_radius`."""
    if cfg.window is not None:
        return int(cfg.window), int(cfg.window)
    pitch = point_spacing(pts, ok)
    out = []
    for radius in (cfg.normal_radius, cfg.feature_radius):
        if not math.isfinite(pitch) or pitch <= 0:
            out.append(int(cfg.max_window))
            continue
        win = math.ceil(radius / pitch) + 1
        if win > cfg.max_window:
            log.debug("FPFH window %d capped at max_window=%d", win, cfg.max_window)
        out.append(int(min(max(win, 1), cfg.max_window)))
    return out[0], out[1]


def grid_normals(
    pts: np.ndarray, ok: np.ndarray, cfg: FPFHConfig, window: int | None = None
) -> np.ndarray:
    """Unit normals (R, C, 3) of the float64 grid points `pts` where `ok`, facing the origin.

    `window` defaults to the one `windows_for` derives. Zero where not `ok`.
    """
    rows, cols = ok.shape
    win = windows_for(pts, ok, cfg)[0] if window is None else int(window)
    run = _Rows(rows, win, _threads(cfg))
    s1 = np.zeros((rows, cols, 3))
    s2 = np.zeros((rows, cols, 6))
    cnt = np.zeros((rows, cols), np.int32)
    run.pairs(_normals_accumulate, pts, ok, float(cfg.normal_radius) ** 2, win, s1, s2, cnt)
    normals = np.zeros((rows, cols, 3))
    run.each(_normals_finish, pts, ok, s1, s2, cnt, normals)
    return normals


def grid_fpfh(
    pts: np.ndarray,
    ok: np.ndarray,
    normals: np.ndarray,
    cfg: FPFHConfig,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FPFH (R, C, 33) float32 and neighbour counts (R, C) of the grid points where `ok`.

    Zero for invalid points and for points without neighbours within `feature_radius`.
    """
    rows, cols = ok.shape
    if normals.shape != pts.shape:
        raise ValueError(f"normals shape {normals.shape} must match the points {pts.shape}")
    win = windows_for(pts, ok, cfg)[1] if window is None else int(window)
    run = _Rows(rows, win, _threads(cfg))
    nrm = np.ascontiguousarray(normals, dtype=np.float64)
    r2 = float(cfg.feature_radius) ** 2
    counts = np.zeros((rows, cols, 33), np.int32)
    nnb = np.zeros((rows, cols), np.int32)
    run.pairs(_spfh_accumulate, pts, nrm, ok, r2, win, counts, nnb)
    spfh = np.zeros((rows, cols, 33))
    run.each(_spfh_finish, counts, nnb, spfh)
    acc = np.zeros((rows, cols, 33))
    run.pairs(_fpfh_accumulate, pts, spfh, ok, r2, win, acc)
    out = np.zeros((rows, cols, 33), np.float32)
    run.each(_fpfh_finish, acc, spfh, nnb, out)
    return out, nnb


def compute_normals(xyz: np.ndarray, mask: np.ndarray, cfg: FPFHConfig) -> np.ndarray:
    """Unit normals (S', S', 3) on the sampled grid, facing the camera; zero where invalid."""
    pts, ok = sample_grid(xyz, mask, cfg.step)
    return grid_normals(pts, ok, cfg)


def compute_fpfh(
    xyz: np.ndarray, mask: np.ndarray, normals: np.ndarray, cfg: FPFHConfig
) -> np.ndarray:
    """FPFH (S', S', 33) float32 on the sampled grid; `normals` are on the sampled grid.

    Zero for invalid points and for points without neighbours within `feature_radius`.
    """
    pts, ok = sample_grid(xyz, mask, cfg.step)
    return grid_fpfh(pts, ok, normals, cfg)[0]


def pool_patches(
    feat: np.ndarray, size: int, cfg: FPFHConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the points with features (non-zero) of each cell: ((33, h, w), valid (h, w)).

    `feat` is on the sampled grid of a `size` x `size` image.
    """
    side = -(-size // cfg.step)
    if feat.shape != (side, side, DIM):
        raise ValueError(f"features {feat.shape} are not the step-{cfg.step} grid of a "
                         f"{size} x {size} image ({side}, {side}, {DIM})")
    ok = np.ascontiguousarray(feat[..., :11].sum(axis=2) > 0)
    pooled, cnt = _pool_kernel(
        np.ascontiguousarray(feat, dtype=np.float32), ok, cfg.step, size, *cfg.grid
    )
    valid = cnt >= cfg.min_points
    pooled[:, ~valid] = 0.0
    return pooled, valid


class FPFHExtractor:
    """FPFH patch features of a working-resolution point cloud on the (h, w) patch grid.

    Example: `feat, valid = FPFHExtractor(FPFHConfig()).extract(p.xyz, p.foreground)`.
    """

    def __init__(self, cfg: FPFHConfig | None = None, backend: str | None = None) -> None:
        cfg = FPFHConfig() if cfg is None else cfg
        self.cfg = cfg if backend is None else replace(cfg, backend=backend)
        if self.cfg.backend == "open3d":
            from cmad.features._fpfh_open3d import require_open3d

            require_open3d()

    @property
    def dim(self) -> int:
        return DIM

    def identity(self) -> dict:
        """Name and settings, stored with a model to check it is loaded with this extractor.

        The thread count is left out: it does not change the features.
        """
        settings = self.cfg.to_dict()
        del settings["threads"]
        return {"name": "fpfh", "code": CODE_VERSION, "dim": DIM, **settings}

    def point_features(self, xyz: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Per-point FPFH (S', S', 33) on the sampled grid, with the configured backend."""
        pts, ok = sample_grid(xyz, foreground, self.cfg.step)
        win_n, win_f = windows_for(pts, ok, self.cfg)
        normals = grid_normals(pts, ok, self.cfg, win_n)
        if self.cfg.backend == "open3d":
            from cmad.features._fpfh_open3d import fpfh_open3d_grid

            return fpfh_open3d_grid(pts, ok, normals, self.cfg.feature_radius)
        return grid_fpfh(pts, ok, normals, self.cfg, win_f)[0]

    def extract(self, xyz: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(33, h, w) float32 patch features and (h, w) bool patch validity."""
        xyz = np.asarray(xyz)
        if xyz.ndim != 3 or xyz.shape[0] != xyz.shape[1]:
            raise ValueError(f"xyz must be a square (S, S, 3) cloud, got shape {xyz.shape}")
        feat = self.point_features(xyz, foreground)
        return pool_patches(feat, xyz.shape[0], self.cfg)

    def extract_batch(
        self, items: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stacked `extract` of (xyz, foreground) pairs: (B, 33, h, w), (B, h, w)."""
        if not items:
            raise ValueError("empty batch")
        out = [self.extract(x, f) for x, f in items]
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
