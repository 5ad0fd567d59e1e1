"""The part families' height fields: one function per family.

Each takes the part-frame coordinates (a, b) of the height-field grid in millimetres, the
scene's random generator and a texture sampler, and returns the height above the table (mm,
0 off the part) and the material weights (K, ...) in the order of the family's materials.
"""
from __future__ import annotations

import numpy as np

from cmad.synth.fields import fourier_ring, local_window, smoothstep
from cmad.synth.textures import TexSampler


def shape_gland(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                tex: TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Cable gland: steel flange with four bolt holes and a dark rim, brass hex body with
    chamfered corners, a bright threaded collar, a black plastic dome nut and rubber seal."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    rf = 27.0 * rng.uniform(0.985, 1.015)
    h = np.where(rho <= rf, np.minimum(7.5, 5.8 + 1.3 * (rf - rho)), 0.0)
    holes = np.zeros_like(rho, dtype=bool)
    for k in range(4):
        ang = np.pi / 4 + k * np.pi / 2
        holes |= np.hypot(a - 21.0 * np.cos(ang), b - 21.0 * np.sin(ang)) < 2.6
    h = np.where(holes, 0.0, h)
    dist_hex = np.max(np.stack([np.abs(a * np.cos(t) + b * np.sin(t))
                                for t in (0.0, np.pi / 3, 2 * np.pi / 3)]), axis=0)
    hex_h = 13.0 + rng.uniform(-0.2, 0.2)
    hex_top = np.minimum(hex_h, hex_h - 1.2 * (rho - 14.6))
    in_hex = dist_hex <= 14.0
    h = np.where(in_hex, np.maximum(h, hex_top), h)
    collar = rho <= 12.3
    thread = hex_h + 1.6 + 0.28 * np.cos(2 * np.pi * rho / 0.85)
    h = np.where(collar, thread, h)
    dome = rho <= 10.0
    dome_h = hex_h + 2.0 + 3.5 * np.sqrt(np.clip(1.0 - ((rho - 6.8) / 3.3) ** 2, 0.0, 1.0))
    h = np.where(dome, dome_h, h)
    seal = rho <= 3.9
    h = np.where(seal, hex_h - 1.0 + 0.3 * np.cos(6 * phi) * (rho > 1.8), h)
    h = np.where(rho <= 1.8, hex_h - 4.0, h)
    on = h > 0
    w_rim = (on & ~in_hex & (rho > 23.8)).astype(np.float64)
    w_steel = (on & ~in_hex & (rho <= 23.8)).astype(np.float64)
    w_brass = (in_hex & ~collar).astype(np.float64)
    w_thread = (collar & ~dome).astype(np.float64)
    w_cap = (dome & ~seal).astype(np.float64)
    w_seal = seal.astype(np.float64)
    return h, np.stack([w_steel, w_rim, w_brass, w_thread, w_cap, w_seal])


def shape_bagel(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                tex: TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Bagel: a flattened, lumpy torus; glossy brown glazed top over a pale floury flank,
    with sesame seeds on the glaze."""
    ell = rng.uniform(0.95, 1.05)
    rho = np.hypot(a * ell, b / ell)
    phi = np.arctan2(b, a)
    big_r = 24.0 * rng.uniform(0.96, 1.04) * (1 + fourier_ring(phi, rng, range(2, 6), 0.03))
    tube = 12.0 * rng.uniform(0.95, 1.05) * (1 + fourier_ring(phi, rng, range(2, 7), 0.08))
    q = (rho - big_r) / tube
    off = rng.uniform(0, 300, 2)
    lumps = tex("moon", a, b, 0.35, tuple(off))
    prof = np.sqrt(np.clip(1.0 - q ** 2, 0.0, 1.0))
    h = (1.2 + 11.0 * prof ** 0.8) * (1.0 + 0.03 * lumps) * (prof > 0)
    glaze_edge = 0.62 + 0.12 * fourier_ring(phi * 3, rng, range(1, 5), 1.0)
    w_glaze = smoothstep(glaze_edge + 0.08, glaze_edge - 0.08, np.abs(q)) * (prof > 0)
    w_seed = np.zeros_like(h)
    n_seeds = int(rng.integers(22, 38))
    for _ in range(n_seeds):
        ang = rng.uniform(0, 2 * np.pi)
        rr = rng.uniform(-0.5, 0.5)
        sa = np.mean(big_r) + rr * np.mean(tube)
        ca, cb = sa * np.cos(ang), sa * np.sin(ang)
        o = rng.uniform(0, np.pi)
        sl = local_window(a, b, ca, cb, 1.6)
        la, lb = a[sl] - ca, b[sl] - cb
        da = la * np.cos(o) + lb * np.sin(o)
        db = -la * np.sin(o) + lb * np.cos(o)
        e = (da / 1.5) ** 2 + (db / 0.75) ** 2
        seed = np.clip(1.0 - e, 0.0, 1.0) * (prof[sl] > 0.3)
        h[sl] = h[sl] + 0.45 * np.sqrt(seed)
        w_seed[sl] = np.maximum(w_seed[sl], seed > 0)
    w_glaze = w_glaze * (1 - w_seed)
    on = (h > 0).astype(np.float64)
    w_flank = on * (1 - w_glaze - w_seed)
    return h, np.stack([w_glaze, w_flank, w_seed])


def shape_rope(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
               tex: TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Rope: a three-strand laid rope lying on the table, whipped with red tape near both
    ends, frayed pale fibres at the ends."""
    r = 7.2 * rng.uniform(0.96, 1.04)
    half = 50.0 * rng.uniform(0.97, 1.03)
    pitch = 48.0 * rng.uniform(0.95, 1.05)
    psi = np.arcsin(np.clip(b / r, -1.0, 1.0))
    inside = np.abs(b) < r
    body = np.where(inside, r + np.sqrt(np.clip(r * r - b * b, 0.0, None)), 0.0)
    w = 3.0 * (a / pitch + psi / (2 * np.pi)) + rng.uniform(0, 3)
    qq = w - np.floor(w)
    strand = 1.0 - np.sqrt(np.clip(1.0 - (2 * qq - 1) ** 2, 0.0, 1.0))
    fib = tex("fibre", a, b, 0.10, tuple(rng.uniform(0, 300, 2)),
              angle=np.arctan2(2 * np.pi * r, pitch) * 0.6)
    h = body - (2.4 * strand ** 1.3 + 0.15 * fib) * np.cos(psi)
    aa = np.abs(a)
    tape_lo, tape_hi = half - 14.0, half - 5.0
    tape = (aa >= tape_lo) & (aa <= tape_hi) & inside
    tape_h = 0.5 + r + np.sqrt(np.clip((r + 0.5) ** 2 - b * b, 0.0, None))
    h = np.where(tape, np.maximum(tape_h - 0.5 * (np.abs(b) > r - 0.5), h), h)
    fray = (aa > tape_hi) & inside
    taper = np.clip((half + 2.0 - aa) / 7.0, 0.0, 1.0)
    h = np.where(fray, (body - 0.6 * np.abs(fib) - 1.2 * strand) * (0.55 + 0.45 * taper), h)
    h = np.where(aa > half + rng.uniform(0, 2), 0.0, h)
    h = np.clip(h, 0.0, None) * inside
    on = (h > 0.05).astype(np.float64)
    w_tape = tape * on
    w_fray = fray * on
    w_fibre = on * (1 - w_tape - w_fray)
    return h, np.stack([w_fibre, w_tape, w_fray])


def shape_cookie(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                 tex: TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Cookie: a rough irregular disc with a domed top, a darker baked rim and raised
    glossy chocolate chips."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    rc = 26.0 * rng.uniform(0.96, 1.04) * (1 + fourier_ring(phi, rng, range(3, 9), 0.035))
    edge = 4.5
    top = 9.5 + 1.2 * (1 - (rho / rc) ** 2)
    d_in = rc - rho
    prof = np.where(d_in >= edge, 1.0,
                    np.sqrt(np.clip(1.0 - ((edge - d_in) / edge) ** 2, 0.0, 1.0)))
    off = tuple(rng.uniform(0, 300, 2))
    rough = tex("gravel", a, b, 0.09, off)
    lumps = tex("moon", a, b, 0.3, tuple(rng.uniform(0, 300, 2)))
    h = (top * prof + 0.22 * rough + 0.35 * lumps) * (d_in > 0)
    w_chip = np.zeros_like(h)
    for _ in range(int(rng.integers(9, 15))):
        rr = np.sqrt(rng.uniform(0, 1)) * (np.mean(rc) - 7.0)
        ang = rng.uniform(0, 2 * np.pi)
        ca, cb = rr * np.cos(ang), rr * np.sin(ang)
        size = rng.uniform(1.6, 3.0)
        sl = local_window(a, b, ca, cb, size * 1.3)
        la, lb = a[sl] - ca, b[sl] - cb
        cphi = np.arctan2(lb, la)
        cr = size * (1 + 0.12 * np.cos(3 * cphi + rng.uniform(0, 6)) + 0.12 * np.cos(
            2 * cphi + rng.uniform(0, 6)))
        e = np.hypot(la, lb) / cr
        bump = np.sqrt(np.clip(1.0 - e ** 2, 0.0, 1.0))
        h[sl] = np.maximum(h[sl], (top[sl] * prof[sl] + rng.uniform(0.8, 1.4) * bump) * (bump > 0))
        w_chip[sl] = np.maximum(w_chip[sl], (bump > 0).astype(np.float64))
    h = np.clip(h, 0.0, None) * (d_in > 0)
    on = (h > 0).astype(np.float64)
    w_rim = smoothstep(7.5, 2.5, d_in) * on * (1 - w_chip)
    w_dough = on * (1 - w_rim - w_chip)
    return h, np.stack([w_dough, w_rim, w_chip * on])


def shape_tire(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
               tex: TexSampler) -> tuple[np.ndarray, np.ndarray]:
    """Toy tyre lying flat: black rubber sidewall with a rib and raised lettering, a tread
    with radial grooves on the shoulder, a silver rim with five holes and a red hub cap."""
    rho = np.hypot(a, b)
    phi = np.arctan2(b, a)
    r_in, r_out = 14.5, 31.0 * rng.uniform(0.99, 1.01)
    u = (rho - r_in) / (r_out - r_in)
    ring = (u >= 0) & (u <= 1)
    h_side = 8.0 + 7.5 * np.sqrt(np.clip(1.0 - ((u - 0.5) / 0.62) ** 2, 0.0, 1.0))
    h_side = h_side + 0.45 * np.exp(-((rho - 19.5) / 0.35) ** 2)
    letters = np.zeros_like(rho, dtype=bool)
    for _ in range(int(rng.integers(10, 16))):
        c = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.04, 0.12)
        dphi = np.angle(np.exp(1j * (phi - c)))
        letters |= (np.abs(dphi) < width / 2) & (np.abs(rho - 22.6) < 1.0)
    h_side = h_side + 0.35 * letters
    n_tread = 30
    tphase = phi * n_tread / (2 * np.pi) + 0.3 * np.sin(rho * 0.9)
    groove = ((tphase - np.floor(tphase)) < 0.28) | (np.abs(rho - 28.9) < 0.45)
    tread = (rho > 27.3) & groove
    h_side = h_side - 1.7 * tread
    h = np.where(ring, h_side, 0.0)
    rim = rho < r_in
    h_rim = np.full_like(rho, 6.2)
    holes = np.zeros_like(rim)
    for k in range(5):
        ang = 2 * np.pi * k / 5
        holes |= np.hypot(a - 9.6 * np.cos(ang), b - 9.6 * np.sin(ang)) < 2.6
    h_rim = np.where(holes, 0.0, h_rim)
    hub = rho < 4.2
    h_rim = np.where(hub, 6.2 + 2.8 * np.sqrt(np.clip(1 - (rho / 4.2) ** 2, 0.0, 1.0)), h_rim)
    h = np.where(rim, h_rim, h)
    w_side = (ring & ~tread & (rho <= 27.3)).astype(np.float64)
    w_tread = (ring & ((rho > 27.3) | tread)).astype(np.float64)
    w_rim = (rim & ~hub & ~holes).astype(np.float64)
    w_hub = hub.astype(np.float64)
    return h, np.stack([w_side, w_tread, w_rim, w_hub])
