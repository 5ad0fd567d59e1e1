"""Pasted synthetic defects: what the fusion may learn from without any test data."""
import numpy as np

from cmad.data.mvtec3d import Dataset
from cmad.data.preprocess import PreprocessConfig, Preprocessor
from cmad.model.calibrate import calibration_set, paste_defect


def _prepared(tiny_root):
    cat = Dataset(tiny_root).category(Dataset(tiny_root).categories[0])
    return Preprocessor(PreprocessConfig(size=224)).prepare_many(cat.samples("validation"),
                                                               progress=False)


def test_pasted_defects_change_only_their_modality_inside_the_mask(tiny_root):
    p = _prepared(tiny_root)[0]
    rng = np.random.default_rng(0)
    colour = paste_defect(p, "colour", rng)
    assert colour is not None and colour.label == 1 and colour.gt.any()
    assert np.array_equal(colour.xyz, p.xyz)
    changed = np.any(colour.rgb != p.rgb, axis=2)
    assert changed.any() and not (changed & ~colour.gt & ~p.foreground).any()
    dent = paste_defect(p, "dent", np.random.default_rng(1))
    assert dent is not None and np.array_equal(dent.rgb, p.rgb)
    moved = np.abs(dent.xyz[..., 2] - p.xyz[..., 2])
    assert moved.max() > 0.0004 and moved.max() < 0.002  # 0.5-1.5 mm
    assert not dent.gt[~p.foreground].any()


def test_calibration_set_keeps_the_normals_first_and_is_seeded(tiny_root):
    normals = _prepared(tiny_root)
    a = calibration_set(normals, seed=3, per_sample=2)
    b = calibration_set(normals, seed=3, per_sample=2)
    assert a[: len(normals)] == normals
    assert all(q.label == 1 for q in a[len(normals):]) and len(a) > len(normals)
    assert [q.stem for q in a] == [q.stem for q in b]
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a, b))
    assert calibration_set(normals, seed=3, per_sample=0) == normals
    pasted = calibration_set(normals, per_sample=2, has_rgb=False)[len(normals):]
    assert pasted and {q.defect_type for q in pasted} <= {"pasted_bump", "pasted_dent"}
