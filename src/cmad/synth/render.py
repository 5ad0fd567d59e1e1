"""Rendering a scene with its defects: the shaded RGB image, the organized point cloud with a
structured-light scanner's noise and invalid points, and the ground-truth mask."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmad.synth.catalog import CLASS_IDS
from cmad.synth.defects import Defect
from cmad.synth.raycast import bilinear, raycast
from cmad.synth.scene import BASELINE, Scene, srgb_to_linear


@dataclass(frozen=True)
class Rendered:
    """One rendered sample: rgb uint8 (H, W, 3), xyz float32 (H, W, 3) in metres with
    invalid points exactly 0, gt uint8 (H, W) with class_ids values."""

    rgb: np.ndarray
    xyz: np.ndarray
    gt: np.ndarray


def _mul3(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x (N, 3) @ m (3, K) without BLAS."""
    return x[:, 0:1] * m[0][None, :] + x[:, 1:2] * m[1][None, :] + x[:, 2:3] * m[2][None, :]


def render_scene(scene: Scene, defects: list[Defect], rng: np.random.Generator) -> Rendered:
    """Ray-cast `scene` with `defects` applied: RGB shaded from the true normals (ambient
    with cavity occlusion, Lambert with soft shadows, Blinn-Phong, lens blur and sensor
    noise), the scanner's point cloud (`_scan`) and the gt of each defect's support as
    seen by the camera. `rng` draws the sensor noise and the invalid points only."""
    cat = scene.cat
    w, h, ds = scene.width, scene.height, scene.ds
    k_mat = len(cat.materials)
    hgrid = scene.hgrid.copy()
    gh, gw = hgrid.shape
    gt_grid = np.zeros((gh, gw), dtype=np.uint8)
    # defect channels: stain, cut, contamination alphas and colours; hole alpha
    n_def = len(defects)
    d_alpha = np.zeros((max(n_def, 1), gh, gw))
    hole_a = np.zeros((gh, gw))
    for idx, d in enumerate(defects):
        hgrid += d.dh
        gt_grid[d.support] = CLASS_IDS[d.kind]
        if d.kind == "hole":
            hole_a = np.maximum(hole_a, d.alpha)
        else:
            d_alpha[idx] = d.alpha
    hgrid = np.clip(hgrid, 0.0, None)
    gy, gx = np.gradient(hgrid, ds)
    c1 = ndimage.gaussian_filter(hgrid, 0.8 / ds) - hgrid
    coarse = ndimage.gaussian_filter(hgrid[::4, ::4], 1.0 / ds)
    ii, jj = np.mgrid[0:gh, 0:gw]
    c2 = ndimage.map_coordinates(coarse, [ii / 4.0, jj / 4.0], order=1, mode="nearest") - hgrid
    ao = np.clip(1.0 - 0.25 * np.clip(c1, 0, None) - 0.06 * np.clip(c2, 0, None), 0.25, 1.0)
    chans = [gx, gy, ao, hole_a] + list(scene.weights) + list(d_alpha)
    grid = np.ascontiguousarray(np.stack(chans, axis=2).astype(np.float32))

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dcam = np.stack([(xs.ravel() - scene.cx) / scene.f, (ys.ravel() - scene.cy) / scene.f,
                     np.ones(w * h)], axis=1)
    basis = np.stack([scene.e1, scene.e2, scene.nrm])
    # explicit products: a BLAS call on (N, 3) arrays is slow and threads needlessly
    dirs = _mul3(dcam, basis.T)
    origin = basis @ (-scene.c0)
    proj = basis @ (np.array([BASELINE, 0.0, 0.0]) - scene.c0)
    # march limits from the defect-free part too, so that a defect changes nothing else
    hmax = float(max(hgrid.max(), scene.hgrid.max())) + 0.5
    occupied = (hgrid > 0) | (scene.hgrid > 0)
    rows = np.flatnonzero(occupied.any(axis=1))
    cols = np.flatnonzero(occupied.any(axis=0))
    if rows.size:
        box = np.array([scene.u0 + (cols[0] - 1.5) * ds, scene.u0 + (cols[-1] + 1.5) * ds,
                        scene.v0 + (rows[0] - 1.5) * ds, scene.v0 + (rows[-1] + 1.5) * ds])
    else:
        box = np.array([0.0, -1.0, 0.0, -1.0])
    rc = raycast(hgrid, ds, scene.u0, scene.v0, hmax, box, origin,
                 np.ascontiguousarray(dirs), proj, scene.light_t, 8.0)
    t, pu, pv = rc[:, 0], rc[:, 1], rc[:, 2]
    gi = (pv - scene.v0) / ds
    gj = (pu - scene.u0) / ds
    s = bilinear(grid, gi, gj).astype(np.float64)
    hu, hv, ao_p, hole_p = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
    wmat = s[:, 4:4 + k_mat]
    dal = s[:, 4 + k_mat:]
    ni = np.clip(np.rint(gi).astype(np.int64), 0, gh - 1)
    nj = np.clip(np.rint(gj).astype(np.int64), 0, gw - 1)
    gt = gt_grid[ni, nj].reshape(h, w)

    # normals (camera frame) and view vectors
    nrm = scene.nrm[None, :] - hu[:, None] * scene.e1[None, :] - hv[:, None] * scene.e2[None, :]
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    view = -dcam / np.linalg.norm(dcam, axis=1, keepdims=True)
    cos_v = np.einsum("ij,ij->i", nrm, view)

    # albedo: materials with textures in the part's frame, the table in its own frame
    ct, st = np.cos(scene.theta), np.sin(scene.theta)
    ru, rv = pu - scene.center[0], pv - scene.center[1]
    oa = (ct * ru + st * rv) / scene.scale
    ob = (-st * ru + ct * rv) / scene.scale
    mats = list(cat.materials) + [cat.table]
    w_table = np.clip(1.0 - wmat.sum(axis=1), 0.0, 1.0)
    wall = np.concatenate([wmat, w_table[:, None]], axis=1)
    albedo = np.zeros((w * h, 3))
    props = np.zeros((w * h, 3))      # specular strength, shininess, metalness
    for k, m in enumerate(mats):
        sel = np.flatnonzero(wall[:, k] > 1e-3)
        if sel.size == 0:
            continue
        ta, tb = (pu, pv) if k == k_mat else (oa, ob)
        tx = scene.tex(m.texture, ta[sel], tb[sel], m.tex_mm, tuple(scene.tex_offsets[k]),
                       stretch=m.tex_stretch)
        wk = wall[sel, k]
        albedo[sel] += (wk * np.clip(1.0 + m.contrast * tx, 0.2, 2.0))[:, None] * scene.colors[k]
        props[sel] += wk[:, None] * np.array([m.ks, m.shininess, m.metal])
    ks, shin, metal = props[:, 0], props[:, 1], props[:, 2]
    for idx, d in enumerate(defects):
        if d.kind == "hole" or d.color is None:
            continue
        al = np.clip(dal[:, idx], 0.0, 1.0)
        sel = al > 1e-4
        if not sel.any():
            continue
        col = srgb_to_linear(np.array(d.color))
        tx = scene.tex("gravel", oa[sel], ob[sel], 0.08, (idx * 97.0, 13.0))
        tint = col[None, :] * np.clip(1.0 + 0.15 * tx, 0.5, 1.5)[:, None]
        if d.kind == "stain":
            # a stain keeps the texture's shading: multiply by the ratio of colours
            base = albedo[sel].mean(axis=1, keepdims=True) + 1e-3
            tint = tint * np.clip(albedo[sel] / base, 0.5, 1.5) ** 0.3
        albedo[sel] = (1 - al[sel, None]) * albedo[sel] + al[sel, None] * tint
        if d.kind == "contamination":
            ks[sel] = (1 - al[sel]) * ks[sel] + al[sel] * 0.12
            metal[sel] *= 1 - al[sel]
    albedo *= (1.0 - 0.85 * hole_p)[:, None]
    ks *= 1.0 - hole_p

    # shading: ambient with cavity occlusion, Lambert with soft shadows, Blinn-Phong
    light = scene.light_t @ np.stack([scene.e1, scene.e2, scene.nrm])
    vis = np.clip(rc[:, 5], 0.0, 1.0)
    lam = np.clip(_mul3(nrm, light[:, None])[:, 0], 0.0, None)
    half = light[None, :] + view
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = np.clip(np.einsum("ij,ij->i", nrm, half), 0.0, 1.0) ** np.maximum(shin, 1.0)
    spec *= (shin + 2) / 8.0 * 0.25
    shade = scene.ambient * ao_p * (0.6 + 0.4 * np.clip(nrm[:, 2] * -1.0, 0, 1)) + (
        scene.light_i * (1 - scene.ambient) * lam * (0.25 + 0.75 * vis))
    spec_col = (1 - metal)[:, None] + metal[:, None] * albedo / (
        albedo.max(axis=1, keepdims=True) + 1e-3)
    lin = albedo * shade[:, None] + (ks * scene.light_i * spec * vis * lam ** 0.2)[:, None] * (
        spec_col)
    rr = ((xs.ravel() - w / 2) ** 2 + (ys.ravel() - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    lin *= (scene.exposure * 1.25 * (1.0 - 0.22 * rr))[:, None]
    img = np.power(np.clip(lin, 0.0, 1.0), 1 / 2.2).reshape(h, w, 3)
    img = ndimage.gaussian_filter(img, (0.55, 0.55, 0), mode="nearest")
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * (0.008 + 0.012 * np.sqrt(img))
    rgb = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    xyz = _scan(t, dcam, cos_v, rc[:, 4] > 0.5, hole_p, w, h, rng)
    return Rendered(rgb=rgb, xyz=xyz, gt=gt)


def _scan(t: np.ndarray, dcam: np.ndarray, cos_v: np.ndarray, occluded: np.ndarray,
          hole_p: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """The organized point cloud (H, W, 3) float32 in metres from the per-pixel ray depths
    `t` (mm along rays `dcam` of unit z): depth noise along the ray, then the invalid points
    of a structured-light scanner, exactly 0: projector occlusion (`occluded`), grazing
    angles, holes, specks, depth jumps, blobs and the image border."""
    sigma = rng.uniform(0.10, 0.25)
    noise = rng.normal(0.0, 1.0, w * h) * sigma / np.clip(np.abs(cos_v), 0.3, 1.0)
    z = t + noise
    xyz = (dcam * z[:, None]).reshape(h, w, 3) / 1000.0
    invalid = occluded.copy()
    invalid |= np.abs(cos_v) < rng.uniform(0.12, 0.3, w * h)
    invalid |= (hole_p > 0.3) & (rng.random(w * h) < 0.55)
    invalid |= rng.random(w * h) < rng.uniform(0.001, 0.004)
    invalid = invalid.reshape(h, w)
    zz = t.reshape(h, w)
    jump = np.zeros((h, w), dtype=bool)
    dz_x = np.abs(np.diff(zz, axis=1)) > 1.5
    dz_y = np.abs(np.diff(zz, axis=0)) > 1.5
    jump[:, 1:] |= dz_x
    jump[:, :-1] |= dz_x
    jump[1:, :] |= dz_y
    jump[:-1, :] |= dz_y
    invalid |= jump & (rng.random((h, w)) < 0.6)
    for _ in range(int(rng.integers(2, 6))):
        ci, cj = rng.integers(0, h), rng.integers(0, w)
        rad = rng.uniform(0.8, 2.2) * max(1.0, w / 320)
        yy, xx = np.ogrid[0:h, 0:w]
        invalid |= (yy - ci) ** 2 + (xx - cj) ** 2 <= rad ** 2
    bw = max(1, round(w / 160))
    sides = rng.integers(0, bw + 1, 4)
    invalid[:sides[0], :] = True
    invalid[h - sides[1]:, :] = True
    invalid[:, :sides[2]] = True
    invalid[:, w - sides[3]:] = True
    xyz[invalid] = 0.0
    return np.ascontiguousarray(xyz, dtype=np.float32)
