"""Numba kernels: rays cast through a height field (depth, projector occlusion, soft shadow)
and bilinear sampling of per-grid-point channels at the hit points."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _hsample(hg: np.ndarray, gi: float, gj: float) -> float:
    """Bilinear height at grid coordinates (gi, gj); 0 outside the grid."""
    n0, n1 = hg.shape
    if gi < 0.0 or gj < 0.0 or gi > n0 - 1.0 or gj > n1 - 1.0:
        return 0.0
    i = int(gi)
    j = int(gj)
    i = min(i, n0 - 2)
    j = min(j, n1 - 2)
    fi = gi - i
    fj = gj - j
    return ((hg[i, j] * (1.0 - fj) + hg[i, j + 1] * fj) * (1.0 - fi)
            + (hg[i + 1, j] * (1.0 - fj) + hg[i + 1, j + 1] * fj) * fi)


@njit(cache=True)
def _clip(pu: float, pv: float, du: float, dv: float, s0: float, s1: float,
          box: np.ndarray) -> tuple[float, float]:
    """Clip the parameter range [s0, s1] of the line (pu, pv) + s (du, dv) to a box
    (u_min, u_max, v_min, v_max) (slab method); an empty range has s0 > s1."""
    for axis in range(2):
        p = pu if axis == 0 else pv
        d = du if axis == 0 else dv
        lo = box[2 * axis]
        hi = box[2 * axis + 1]
        if lo > hi:
            return 1.0, 0.0
        if abs(d) < 1e-12:
            if p < lo or p > hi:
                return 1.0, 0.0
            continue
        a = (lo - p) / d
        b = (hi - p) / d
        if a > b:
            a, b = b, a
        s0 = max(s0, a)
        s1 = min(s1, b)
    return s0, s1


@njit(cache=True)
def raycast(hg: np.ndarray, ds: float, u0: float, v0: float, hmax: float, box: np.ndarray,
            origin: np.ndarray, dirs: np.ndarray, proj: np.ndarray, light: np.ndarray,
            soft: float) -> np.ndarray:
    """Cast one ray per pixel through the height field (table frame, mm).

    The height field is zero outside `box`. Returns (N, 6): depth t (the ray has unit z in
    the camera frame, so t is z in mm), hit u, v, h, 1.0 where the projector cannot see the
    hit point, and the light's visibility in [0, 1] (soft shadow)."""
    n = dirs.shape[0]
    out = np.zeros((n, 6))
    ou, ov, oh = origin[0], origin[1], origin[2]
    for p in range(n):
        du, dv, dh = dirs[p, 0], dirs[p, 1], dirs[p, 2]
        t_bot = (0.0 - oh) / dh
        hit = t_bot
        t_a, t_b = _clip(ou, ov, du, dv, (hmax - oh) / dh, t_bot, box)
        if t_a < t_b:
            horiz = np.sqrt(du * du + dv * dv) * (t_b - t_a)
            nst = int(horiz / (0.6 * ds)) + 2
            dt = (t_b - t_a) / nst
            t_prev = t_a
            for k in range(nst + 1):
                t = t_a + k * dt
                ph = oh + t * dh
                hh = _hsample(hg, (ov + t * dv - v0) / ds, (ou + t * du - u0) / ds)
                if ph <= hh:
                    lo = t_prev
                    hi = t
                    for _ in range(10):
                        m = 0.5 * (lo + hi)
                        if oh + m * dh <= _hsample(hg, (ov + m * dv - v0) / ds,
                                                   (ou + m * du - u0) / ds):
                            hi = m
                        else:
                            lo = m
                    hit = hi
                    break
                t_prev = t
        pu = ou + hit * du
        pv = ov + hit * dv
        ph = oh + hit * dh
        out[p, 0] = hit
        out[p, 1] = pu
        out[p, 2] = pv
        out[p, 3] = ph
        # projector occlusion: march toward the projector while below the highest point
        qu = proj[0] - pu
        qv = proj[1] - pv
        qh = proj[2] - ph
        qn = np.sqrt(qu * qu + qv * qv + qh * qh)
        qu /= qn
        qv /= qn
        qh /= qn
        step = 0.8 * ds / max(np.sqrt(qu * qu + qv * qv), 1e-6)
        s_a, s_b = _clip(pu, pv, qu, qv, step, (hmax - ph) / qh, box)
        if s_a < s_b:
            s = s_a
            while s <= s_b:
                hh = _hsample(hg, (pv + s * qv - v0) / ds, (pu + s * qu - u0) / ds)
                if hh > ph + s * qh + 0.08:
                    out[p, 4] = 1.0
                    break
                s += step
        # soft shadow toward the (directional) light
        lu, lv, lh = light[0], light[1], light[2]
        step = 1.25 * ds / max(np.sqrt(lu * lu + lv * lv), 1e-6)
        vis = 1.0
        s_a, s_b = _clip(pu, pv, lu, lv, step, (hmax - ph) / lh, box)
        if s_a < s_b:
            s = s_a
            while s <= s_b:
                hh = _hsample(hg, (pv + s * lv - v0) / ds, (pu + s * lu - u0) / ds)
                d = (ph + s * lh - hh) * soft / s
                if d < vis:
                    vis = d
                    if vis <= 0.0:
                        vis = 0.0
                        break
                s += step
        out[p, 5] = vis
    return out


@njit(cache=True)
def bilinear(grid: np.ndarray, gi: np.ndarray, gj: np.ndarray) -> np.ndarray:
    """Bilinear samples (N, C) of a (Gh, Gw, C) grid, clamped at its borders."""
    n0, n1, c = grid.shape
    n = gi.shape[0]
    out = np.empty((n, c), dtype=grid.dtype)
    for p in range(n):
        y = min(max(gi[p], 0.0), n0 - 1.0)
        x = min(max(gj[p], 0.0), n1 - 1.0)
        i = min(int(y), n0 - 2)
        j = min(int(x), n1 - 2)
        fy = y - i
        fx = x - j
        for k in range(c):
            out[p, k] = ((grid[i, j, k] * (1 - fx) + grid[i, j + 1, k] * fx) * (1 - fy)
                         + (grid[i + 1, j, k] * (1 - fx) + grid[i + 1, j + 1, k] * fx) * fy)
    return out
