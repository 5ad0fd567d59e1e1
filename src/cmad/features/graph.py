"""The feature stages as torch operations that export to ONNX (`cmad export`).

`FeatureGraph(extractor)` is an `nn.Module` that computes, from batched tensors, the same
`FeatureMaps` as `FeatureExtractor.extract` does from `Prepared` samples with numpy and
numba:

- the patch masks `image` (from each sample's placement in the working square) and
  `valid` (foreground share per patch), and the pixel mask `area`;
- the RGB CNN features (the extractor's own `FeaturePipeline`, the same module);
- `colour` statistics and geometric `context`;
- `geom`: the prepared cloud rendered as shading / normals / curvature
  (`cmad.features.geometry`) in float64 where the numba kernels are, so that the uint8
  rendering is the same, then the same CNN.

FPFH (`xyz`) is the one stage that stays outside: its neighbour search over a metric
radius is a data-dependent gather that ONNX cannot express at a sensible cost. The graph
takes it as an input (`fpfh` (B, h, w, 33) float32 and `fpfh_valid` (B, h, w) bool),
computed by the same numba code (`FPFHExtractor.extract`) in the Python front end.

Inputs (all batched, B first; S the working size):
- rgb uint8 (B, S, S, 3); xyz float32 (B, S, S, 3), zero off the foreground;
  foreground bool (B, S, S);
- image_box int64 (B, 4): (orig_h, orig_w, pad_top, pad_left) of `cmad.types.Geometry`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmad.errors import ConfigError
from cmad.features import FeatureMaps

# numba's kernels in cmad.features.geometry, by rendering kind
_KINDS = ("normals", "shading", "curvature", "shading_curvature")


def image_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bool (B, h, w) as `Geometry.image_mask(h, w)`: cells whose centre lies inside the
    original image; `box` int64 (B, 4) = (orig_h, orig_w, pad_top, pad_left)."""
    b = box.to(torch.float64)
    oh, ow, pt, pl = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]
    side = torch.maximum(oh, ow)
    ys = (torch.arange(h, dtype=torch.float64)[None, :] + 0.5) * side / h
    xs = (torch.arange(w, dtype=torch.float64)[None, :] + 0.5) * side / w
    iny = (ys >= pt) & (ys < pt + oh)
    inx = (xs >= pl) & (xs < pl + ow)
    return iny[:, :, None] & inx[:, None, :]


def pool(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean of (B, C, S, S) over the cells of an (h, w) grid -> (B, C, h, w)."""
    k = (int(x.shape[-2]) // grid[0], int(x.shape[-1]) // grid[1])
    return F.avg_pool2d(x, k, stride=k)


def colour_stats(rgb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 6, h, w) as `cmad.features.colour_stats`, from uint8 (B, S, S, 3)."""
    x = rgb.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = pool(x, grid)
    sq = pool(x * x, grid)
    std = torch.sqrt(torch.clamp(sq - mean * mean, min=0.0))
    return torch.cat([mean, std], 1)


def _masked_quantile(v: torch.Tensor, has: torch.Tensor, q: float, median: bool) -> torch.Tensor:
    """Per row of (B, N): numpy's median (`median`) or linear-interpolation percentile q of
    the entries where `has`. Rows with fewer than two entries give 0 (unused)."""
    big = torch.finfo(v.dtype).max
    srt = torch.sort(torch.where(has, v, torch.full_like(v, big)), dim=1).values
    n = has.sum(1).to(torch.float64)
    pos = (n - 1.0) * (0.5 if median else q)
    lo = torch.floor(pos)
    frac = (pos - lo).to(v.dtype)
    lo_i = lo.clamp(min=0).to(torch.int64)
    hi_i = torch.minimum(lo_i + 1, (n - 1).clamp(min=0).to(torch.int64))
    a = torch.gather(srt, 1, lo_i[:, None])[:, 0]
    b = torch.gather(srt, 1, hi_i[:, None])[:, 0]
    if median:
        odd = torch.remainder(n, 2.0) == 1.0
        return torch.where(odd, a, (a + b) * 0.5)
    return a + (b - a) * frac


def _gradient(z: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy.gradient along `dim` of (B, h, w): central differences, one-sided at the ends."""
    n = int(z.shape[dim])
    first = z.narrow(dim, 1, 1) - z.narrow(dim, 0, 1)
    last = z.narrow(dim, n - 1, 1) - z.narrow(dim, n - 2, 1)
    mid = (z.narrow(dim, 2, n - 2) - z.narrow(dim, 0, n - 2)) / 2.0
    return torch.cat([first, mid, last], dim)


def geometry_context(xyz: torch.Tensor, fg: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 3, h, w) as `cmad.features.geometry_context` (height over the part's median
    depth in mm, radial position, slope)."""
    f = fg.to(torch.float32)[:, None]
    count = pool(f, grid)[:, 0]
    sums = pool(xyz.permute(0, 3, 1, 2) * f, grid)
    has = count > 0
    mean = torch.where(has[:, None], sums / torch.clamp(count, min=1e-9)[:, None],
                       torch.zeros_like(sums))
    b = mean.shape[0]
    z = mean[:, 2]
    hasf = has.reshape(b, -1)
    zmed = _masked_quantile(z.reshape(b, -1), hasf, 0.5, median=True)[:, None, None]
    zero = torch.zeros_like(z)
    height = torch.where(has, (zmed - z) * 1000.0, zero)
    hcount = has.sum((1, 2)).to(torch.float32)[:, None]
    cxy = (mean[:, :2] * has[:, None]).sum((2, 3)) / torch.clamp(hcount, min=1.0)
    r = torch.sqrt(((mean[:, :2] - cxy[:, :, None, None]) ** 2).sum(1))
    rmax = _masked_quantile(r.reshape(b, -1), hasf, 0.95, median=False)[:, None, None] + 1e-9
    radial = torch.where(has, r / rmax, zero)
    zf = torch.where(has, z, zmed.expand_as(z))
    gy, gx = _gradient(zf, 1), _gradient(zf, 2)
    slope = torch.where(has, torch.sqrt(gx * gx + gy * gy) * 1000.0, zero)
    out = torch.stack([height, radial, slope], 1)
    enough = (hcount >= 2)[:, :, None, None]
    return torch.where(enough, out, torch.zeros_like(out))


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float | bool = 0) -> torch.Tensor:
    """x[..., y + dy, x + dx] on the last two dims of (B, S, S[, C]) ... as (B, S, S, C) or
    (B, S, S): out-of-range positions get `fill`."""
    chan = x.dim() == 4
    t = x.permute(0, 3, 1, 2) if chan else x[:, None]
    s0, s1 = int(t.shape[-2]), int(t.shape[-1])
    pad = (max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0))
    if t.dtype == torch.bool:
        t = F.pad(t.to(torch.uint8), pad, value=int(fill)).to(torch.bool)
    else:
        t = F.pad(t, pad, value=float(fill))
    t = t[..., max(dy, 0): max(dy, 0) + s0, max(dx, 0): max(dx, 0) + s1]
    return t.permute(0, 2, 3, 1) if chan else t[:, 0]


def _box_smooth(xyz: torch.Tensor, fg: torch.Tensor, radius: int) -> torch.Tensor:
    """`geometry._box_smooth`: the float64 summed-area table of the foreground points, the
    box sums in the same order, the mean cast to float32."""
    if radius <= 0:
        return torch.where(fg[..., None], xyz, torch.zeros_like(xyz))
    s = int(xyz.shape[1])
    vals = torch.cat([torch.where(fg[..., None], xyz.to(torch.float64),
                                  torch.zeros_like(xyz, dtype=torch.float64)),
                      fg[..., None].to(torch.float64)], 3)
    sat = torch.cumsum(torch.cumsum(vals, 2), 1)
    sat = F.pad(sat.permute(0, 3, 1, 2), (1, 0, 1, 0)).permute(0, 2, 3, 1)  # (B, S+1, S+1, 4)
    idx = torch.arange(s)
    lo = torch.clamp(idx - radius, min=0)
    hi = torch.clamp(idx + radius + 1, max=s)

    def at(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return sat[:, ys][:, :, xs]

    box = at(hi, hi) - at(lo, hi) - at(hi, lo) + at(lo, lo)
    mean = box[..., :3] / box[..., 3:4]
    return torch.where(fg[..., None], mean.to(torch.float32), torch.zeros_like(xyz))


def estimate_normals(xyz: torch.Tensor, fg: torch.Tensor, smooth: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`geometry.estimate_normals` batched: unit normals (B, S, S, 3) float32 and ok."""
    fg = fg & torch.isfinite(xyz[..., 0] + xyz[..., 1] + xyz[..., 2])
    p = _box_smooth(xyz, fg, smooth)
    left, right = _shift(fg, 0, -1, False), _shift(fg, 0, 1, False)
    up, down = _shift(fg, -1, 0, False), _shift(fg, 1, 0, False)
    u = torch.where(right[..., None], _shift(p, 0, 1), p) - torch.where(left[..., None],
                                                                        _shift(p, 0, -1), p)
    v = torch.where(down[..., None], _shift(p, 1, 0), p) - torch.where(up[..., None],
                                                                       _shift(p, -1, 0), p)
    ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    nx = vy * uz - vz * uy
    ny = vz * ux - vx * uz
    nz = vx * uy - vy * ux
    length = torch.sqrt(nx * nx + ny * ny + nz * nz)
    ok = fg & (left | right) & (up | down) & (length != 0.0)
    away = nx * p[..., 0] + ny * p[..., 1] + nz * p[..., 2] > 0.0
    length = torch.where(away, -length, length)
    length = torch.where(ok, length, torch.ones_like(length))
    n = torch.stack([nx / length, ny / length, nz / length], 3)
    return torch.where(ok[..., None], n, torch.zeros_like(n)), ok


def normal_divergence(n: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """`geometry.normal_divergence` batched (float64 quotients, the sum cast to float32)."""
    left, right = _shift(ok, 0, -1, False), _shift(ok, 0, 1, False)
    up, down = _shift(ok, -1, 0, False), _shift(ok, 1, 0, False)
    nxa = torch.where(left, _shift(n[..., 0], 0, -1), n[..., 0])
    nxb = torch.where(right, _shift(n[..., 0], 0, 1), n[..., 0])
    nya = torch.where(up, _shift(n[..., 1], -1, 0), n[..., 1])
    nyb = torch.where(down, _shift(n[..., 1], 1, 0), n[..., 1])
    dx = (left.to(torch.float64) + right.to(torch.float64))
    dy = (up.to(torch.float64) + down.to(torch.float64))
    good = ok & (left | right) & (up | down)
    one = torch.ones_like(dx)
    div = ((nxb - nxa).to(torch.float64) / torch.where(good, dx, one)
           + (nyb - nya).to(torch.float64) / torch.where(good, dy, one))
    return torch.where(good, div, torch.zeros_like(div)).to(torch.float32)


def render_geometry(xyz: torch.Tensor, fg: torch.Tensor, cfg) -> torch.Tensor:  # noqa: ANN001
    """uint8 (B, S, S, 3) as `geometry.render_geometry` for a `GeometryConfig`."""
    if cfg.kind not in _KINDS:
        raise ConfigError(f"geometry kind {cfg.kind!r} cannot be exported")
    n, ok = estimate_normals(xyz, fg, cfg.smooth)
    nd = n.to(torch.float64)
    nx, ny, nz = nd[..., 0], nd[..., 1], nd[..., 2]
    chans: list[torch.Tensor] = []
    if cfg.kind == "normals":
        chans = [0.5 * (1.0 + nx), 0.5 * (1.0 - ny), 0.5 * (1.0 - nz)]
    else:
        if cfg.kind in ("shading", "shading_curvature"):
            chans = [torch.clamp(nx * lx + ny * ly + nz * lz, min=0.0) for lx, ly, lz in cfg.lights]
        if cfg.kind in ("curvature", "shading_curvature"):
            div = normal_divergence(n, ok).to(torch.float64)
            curv = 0.5 * (1.0 + torch.tanh(div / float(cfg.curvature_scale)))
            chans = [curv, curv, curv] if cfg.kind == "curvature" else [chans[0], chans[1], curv]
    val = torch.stack(chans, 3)
    code = torch.clamp(torch.floor(val * 255.0 + 0.5), 0.0, 255.0)
    code = torch.where(ok[..., None], code, torch.full_like(code, float(cfg.background)))
    return code.to(torch.uint8)


class FeatureGraph(nn.Module):
    """Batched tensors -> `FeatureMaps` (see the module docstring) and the pixel area.

    `extractor`: the `FeatureExtractor` of the model (its CNN module is used as it is);
    `needs`: the features to compute (all the extractor's by default).
    """

    def __init__(self, extractor, needs=None) -> None:  # noqa: ANN001
        super().__init__()
        self.needs = tuple(sorted(extractor.needs if needs is None else needs))
        missing = set(self.needs) - set(extractor.needs)
        if missing:
            raise ConfigError(f"features {sorted(missing)} are not extracted by this extractor")
        self.size = int(extractor.size)
        self.grid = (int(extractor.grid[0]), int(extractor.grid[1]))
        self.min_foreground = float(extractor.min_foreground)
        self.geometry = extractor.geometry
        self.cnn = None if extractor.cnn is None else extractor.cnn.pipeline
        if self.geometry is not None and self.geometry.kind not in _KINDS:
            raise ConfigError(f"geometry kind {self.geometry.kind!r} cannot be exported")

    def forward(self, rgb: torch.Tensor | None, xyz: torch.Tensor | None, fg: torch.Tensor,
                box: torch.Tensor, fpfh: torch.Tensor | None = None,
                fpfh_valid: torch.Tensor | None = None) -> tuple[FeatureMaps, torch.Tensor]:
        h, w = self.grid
        s = self.size
        image = image_mask(box, h, w)
        area = image_mask(box, s, s)
        share = pool(fg.to(torch.float32)[:, None], self.grid)[:, 0]
        valid = (share >= self.min_foreground) & image
        feats: dict[str, torch.Tensor] = {}
        images = []
        if "rgb" in self.needs:
            images.append(rgb)
        if "geom" in self.needs:
            images.append(render_geometry(xyz, fg, self.geometry))
        if images:
            n = images[0].shape[0]
            out = self.cnn(torch.cat(images, 0) if len(images) > 1 else images[0])
            k = 0
            for name in ("rgb", "geom"):
                if name in self.needs:
                    feats[name] = out[k * n: (k + 1) * n] if len(images) > 1 else out
                    k += 1
        if "colour" in self.needs:
            feats["colour"] = colour_stats(rgb, self.grid)
        xyz_valid = None
        if "xyz" in self.needs:
            feats["xyz"] = fpfh.permute(0, 3, 1, 2)
            xyz_valid = fpfh_valid
        if "context" in self.needs:
            feats["context"] = geometry_context(xyz, fg, self.grid)
        return FeatureMaps(feats, valid, image, xyz_valid), area


__all__ = ["FeatureGraph", "colour_stats", "estimate_normals", "geometry_context",
           "image_mask", "normal_divergence", "render_geometry"]
