"""Rendering the point cloud as an image: shape, background, scale invariance, known planes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cmad.errors import ConfigError
from cmad.features.geometry import (
    KINDS,
    GeometryConfig,
    estimate_normals,
    light_direction,
    normal_divergence,
    patch_coverage,
    render_geometry,
)

S = 64
PITCH = 0.0005  # metres per pixel


def grid_xy(s: int = S) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:s, 0:s].astype(np.float64)
    return (u - s / 2) * PITCH, (v - s / 2) * PITCH


def cloud(z: np.ndarray, fg: np.ndarray) -> np.ndarray:
    x, y = grid_xy(z.shape[0])
    xyz = np.stack([x, y, z], axis=2).astype(np.float32)
    return np.where(fg[..., None], xyz, np.float32(0)).astype(np.float32)


def disc(s: int = S, radius: float = 0.4) -> np.ndarray:
    v, u = np.mgrid[0:s, 0:s]
    return (u - s / 2) ** 2 + (v - s / 2) ** 2 < (radius * s) ** 2


def bumpy_part(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A disc-shaped part with a dome, ripples and depth noise."""
    rng = np.random.default_rng(seed)
    x, y = grid_xy()
    z = 0.5 - 0.004 * np.exp(-(x * x + y * y) / 0.008 ** 2) + 0.0003 * np.sin(x / 0.002)
    z = z + rng.normal(0, 2e-5, z.shape)
    fg = disc() & (rng.random((S, S)) > 0.03)  # a few missing points inside
    return cloud(z, fg), fg


def interior(fg: np.ndarray, margin: int = 4) -> np.ndarray:
    out = np.zeros_like(fg)
    out[margin:-margin, margin:-margin] = fg[margin:-margin, margin:-margin]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_and_constant_background(kind: str) -> None:
    xyz, fg = bumpy_part()
    for bg in (0, 128):
        img = render_geometry(xyz, fg, GeometryConfig(kind=kind, background=bg))
        assert img.shape == (S, S, 3) and img.dtype == np.uint8
        assert (img[~fg] == bg).all()
        # the part itself is not background-coloured everywhere
        assert (img[fg] != bg).any(axis=1).mean() > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_invariant_to_scaling_the_cloud(kind: str) -> None:
    xyz, fg = bumpy_part()
    cfg = GeometryConfig(kind=kind)
    ref = render_geometry(xyz, fg, cfg)
    assert np.array_equal(render_geometry(xyz * 2, fg, cfg), ref)
    other = render_geometry(xyz * np.float32(3.7), fg, cfg).astype(int)
    diff = np.abs(other - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05  # float32 rounding only


@pytest.mark.parametrize("theta_deg", [0.0, 20.0, -35.0])
def test_plane_tilted_about_the_vertical_axis(theta_deg: float) -> None:
    t = math.radians(theta_deg)
    x, _ = grid_xy()
    fg = np.ones((S, S), bool)
    xyz = cloud(0.5 + x * math.tan(t), fg)
    n, ok = estimate_normals(xyz, fg)
    inner = interior(fg)
    assert ok[fg].all()
    np.testing.assert_allclose(n[inner], np.broadcast_to([math.sin(t), 0.0, -math.cos(t)],
                                                         n[inner].shape), atol=1e-4)
    img = render_geometry(xyz, fg, GeometryConfig(kind="normals")).astype(float)
    expect = 127.5 * np.array([1 + math.sin(t), 1.0, 1 + math.cos(t)])
    assert np.abs(img[inner] - expect).max() <= 1.0
    lights = GeometryConfig().lights
    shade = render_geometry(xyz, fg, GeometryConfig(kind="shading")).astype(float)
    normal = np.array([math.sin(t), 0.0, -math.cos(t)])
    expect = 255 * np.clip(np.array(lights) @ normal, 0, 1)
    assert np.abs(shade[inner] - expect).max() <= 1.0


def test_plane_tilted_about_the_horizontal_axis_sets_green() -> None:
    t = math.radians(30.0)
    _, y = grid_xy()
    fg = np.ones((S, S), bool)
    xyz = cloud(0.5 + y * math.tan(t), fg)  # lower rows farther: faces up in the image
    img = render_geometry(xyz, fg, GeometryConfig(kind="normals")).astype(float)
    inner = interior(fg)
    assert np.abs(img[inner][:, 1] - 127.5 * (1 - math.sin(t))).max() <= 1.0


def test_light_from_the_camera_shades_by_the_cosine_of_the_tilt() -> None:
    t = math.radians(40.0)
    x, _ = grid_xy()
    fg = np.ones((S, S), bool)
    head_on = light_direction(0.0, 0.0)
    assert np.allclose(head_on, (0.0, 0.0, -1.0))
    cfg = GeometryConfig(kind="shading", lights=(head_on, head_on, head_on))
    img = render_geometry(cloud(0.5 + x * math.tan(t), fg), fg, cfg).astype(float)
    assert np.abs(img[interior(fg)] - 255 * math.cos(t)).max() <= 1.0


def test_curvature_sign_convex_and_concave() -> None:
    x, y = grid_xy()
    r2 = x * x + y * y
    radius = 0.03
    fg = disc()
    inner = interior(fg, 8) & disc(radius=0.3)
    convex = cloud(0.5 - np.sqrt(radius ** 2 - r2), fg)  # a dome toward the camera
    concave = cloud(0.5 + np.sqrt(radius ** 2 - r2), fg)  # a bowl
    for xyz, sign in ((convex, 1), (concave, -1)):
        n, ok = estimate_normals(xyz, fg)
        div = normal_divergence(n, ok)
        # mean curvature of a sphere: divergence = 2 * pitch / radius per pixel
        np.testing.assert_allclose(div[inner], sign * 2 * PITCH / radius, rtol=0.15)
        img = render_geometry(xyz, fg, GeometryConfig(kind="curvature"))
        assert ((img[inner].astype(int) - 128) * sign > 0).all()


def test_deterministic_and_input_untouched() -> None:
    xyz, fg = bumpy_part(3)
    before = xyz.copy(), fg.copy()
    for kind in KINDS:
        cfg = GeometryConfig(kind=kind)
        assert np.array_equal(render_geometry(xyz, fg, cfg), render_geometry(xyz, fg, cfg))
    assert np.array_equal(xyz, before[0]) and np.array_equal(fg, before[1])


def test_isolated_points_and_non_finite_points_are_background() -> None:
    xyz, fg = bumpy_part()
    fg2 = fg.copy()
    fg2[:3, :3] = False
    fg2[1, 1] = True  # a lone point: no neighbour to take a difference with
    xyz2 = xyz.copy()
    xyz2[1, 1] = (0.001, 0.001, 0.5)
    xyz2[S // 2, S // 2] = np.nan
    fg2[S // 2, S // 2] = True
    img = render_geometry(xyz2, fg2, GeometryConfig(background=7))
    assert (img[1, 1] == 7).all() and (img[S // 2, S // 2] == 7).all()
    assert not np.isnan(estimate_normals(xyz2, fg2)[0]).any()


def test_patch_coverage() -> None:
    fg = np.zeros((8, 8), bool)
    fg[:4, :2] = True
    cov = patch_coverage(fg, (2, 2))
    assert cov.dtype == np.float32
    np.testing.assert_allclose(cov, [[0.5, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError):
        patch_coverage(fg, (3, 3))


def test_config_validation_and_identity() -> None:
    with pytest.raises(ConfigError):
        GeometryConfig(kind="depth")
    with pytest.raises(ConfigError):
        GeometryConfig(smooth=-1)
    with pytest.raises(ConfigError):
        GeometryConfig(lights=((1.0, 0.0, 0.0),))
    with pytest.raises(ConfigError):
        GeometryConfig(lights=((2.0, 0.0, 0.0),) * 3)
    with pytest.raises(ConfigError):
        GeometryConfig(background=300)
    with pytest.raises(ConfigError):
        GeometryConfig.from_dict({"colour": 1})
    cfg = GeometryConfig(kind="normals", smooth=3)
    assert GeometryConfig.from_dict(cfg.to_dict()) == cfg
    ident = cfg.identity()
    assert ident["code_version"] >= 1 and ident["kind"] == "normals"
    assert GeometryConfig().identity() != GeometryConfig(smooth=1).identity()
