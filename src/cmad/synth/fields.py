"""Small helpers over 2-D fields shared by the part shapes and the defects."""
from __future__ import annotations

import numpy as np


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at `e0` to 1 at `e1` (either order)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def fourier_ring(phi: np.ndarray, rng: np.random.Generator, orders: range,
                 amp: float) -> np.ndarray:
    """A smooth random periodic function of the angle, zero mean, amplitude about `amp`."""
    table = np.linspace(-4 * np.pi, 4 * np.pi, 4097)
    vals = np.zeros_like(table)
    for m in orders:
        vals += rng.uniform(0, amp / m ** 0.5) * np.cos(m * table + rng.uniform(0, 2 * np.pi))
    return np.interp(phi, table, vals)


def local_window(a: np.ndarray, b: np.ndarray, ca: float, cb: float, r: float
                 ) -> tuple[slice, slice]:
    """Index window of the grid (a, b affine in the indices) around (ca, cb), radius r mm."""
    ai, aj = a[1, 0] - a[0, 0], a[0, 1] - a[0, 0]
    bi, bj = b[1, 0] - b[0, 0], b[0, 1] - b[0, 0]
    det = ai * bj - aj * bi
    da, db = ca - a[0, 0], cb - b[0, 0]
    i = (da * bj - aj * db) / det
    j = (ai * db - da * bi) / det
    n = r / np.hypot(ai, bi) + 2
    n0, n1 = a.shape
    return (slice(int(np.clip(i - n, 0, n0)), int(np.clip(np.ceil(i + n) + 1, 0, n0))),
            slice(int(np.clip(j - n, 0, n1)), int(np.clip(np.ceil(j + n) + 1, 0, n1))))
