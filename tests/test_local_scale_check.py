"""`bank_density_check`: a bank keeps its local scale only where its map localises the
defects pasted into the validation normals better with it than with the plain distance
(a bank left out of the map: where its image scores rank the pasted copies better)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cmad.data.mvtec3d import Dataset
from cmad.metrics import aupro, aupro_inside
from cmad.model.config import DetectorConfig
from cmad.pipeline import Detector

BANKS = ("rgb_bank", "joint_bank")


def _config(**kw) -> DetectorConfig:  # noqa: ANN003
    """Both banks in the map (so both are judged on their maps), unless told otherwise."""
    return DetectorConfig(size=64, bank_min_entries=16,
                          **{"branches": BANKS, "map_exclude": (), **kw})


def _category(root):  # noqa: ANN001, ANN202
    ds = Dataset(root)
    return ds.category(ds.categories[0])


def _judge(values):  # noqa: ANN001, ANN202
    """A judge that answers `values` in turn (each bank asks: with its scale, then plain)."""
    calls = []

    def judge(gt, maps, area):  # noqa: ANN001, ANN202
        assert gt.shape == maps.shape == area.shape and gt.any()  # pasted defects are there
        calls.append(maps.copy())
        return values[len(calls) - 1]
    return judge, calls


@pytest.mark.parametrize(("values", "kept"), [((0.9, 0.1, 0.9, 0.1), True),
                                              ((0.1, 0.9, 0.1, 0.9), False),
                                              ((0.5, 0.5, 0.5, 0.5), False)])
def test_the_judge_decides_and_the_saved_model_keeps_the_decision(tiny_root, tmp_path,
                                                                  monkeypatch, values, kept):
    judge, calls = _judge(values)
    monkeypatch.setattr("cmad.pipeline.aupro_inside", judge)
    cat = _category(tiny_root)
    det = Detector(_config()).fit(cat, progress=False)
    assert len(calls) == 4   # two banks, each measured both ways
    # the two ways give different maps: the scale changes the bank's scores
    assert not np.allclose(calls[0], calls[1])
    assert set(det.report.bank_scale) == set(BANKS)
    for b in det.core.branches:
        info = det.report.bank_scale[b.name]
        assert info["kept"] is kept and (b.local_scale is not None) is kept
    det.save(tmp_path / "m")
    back = Detector.load(tmp_path / "m")
    assert all((b.local_scale is not None) is kept for b in back.core.branches)
    test = cat.samples("test")[:3]
    assert np.allclose([p.score for p in det.predict(test, branch_maps=False)],
                       [p.score for p in back.predict(test, branch_maps=False)])


@pytest.mark.parametrize("kept", [True, False])
def test_a_checked_model_scores_as_the_unchecked_or_the_plain_one(tiny_root, monkeypatch, kept):
    """Kept: the same model as `bank_density_check: false`; dropped: as `bank_density:
    null` (same coresets, same normalisation on the same normals), scores and maps alike."""
    judge, _ = _judge((0.9, 0.1, 0.9, 0.1) if kept else (0.1, 0.9, 0.1, 0.9))
    monkeypatch.setattr("cmad.pipeline.aupro_inside", judge)
    cat = _category(tiny_root)
    checked = Detector(_config()).fit(cat, progress=False)
    other = Detector(_config(**({"bank_density_check": False} if kept else {"bank_density": None}))
                     ).fit(cat, progress=False)
    assert checked.core.norm == other.core.norm
    test = cat.samples("test")[:4]
    a, b = checked.predict(test, branch_maps=False), other.predict(test, branch_maps=False)
    assert [p.score for p in a] == [p.score for p in b]
    assert all(np.array_equal(p.anomaly_map, q.anomaly_map) for p, q in zip(a, b))


def test_a_bank_out_of_the_map_is_judged_by_its_image_auroc(tiny_root, monkeypatch):
    judge, calls = _judge((0.9, 0.1))
    monkeypatch.setattr("cmad.pipeline.aupro_inside", judge)
    det = Detector(_config(map_exclude=("rgb_bank",))).fit(_category(tiny_root), progress=False)
    assert len(calls) == 2   # the joint bank's map only
    info = det.report.bank_scale
    assert info["joint_bank"]["criterion"] == "AUPRO@30%" and info["joint_bank"]["kept"]
    rgb = info["rgb_bank"]
    assert rgb["criterion"] == "image AUROC" and 0.0 <= rgb["plain"] <= 1.0
    assert rgb["kept"] == (rgb["scaled"] > rgb["plain"])
    # a bank alone is its own map: judged on it even when listed in map_exclude
    judge2, calls2 = _judge((0.1, 0.9))
    monkeypatch.setattr("cmad.pipeline.aupro_inside", judge2)
    alone = Detector(_config(branches=("rgb_bank",), map_exclude=("rgb_bank",))
                     ).fit(_category(tiny_root), progress=False)
    assert len(calls2) == 2 and alone.report.bank_scale["rgb_bank"]["criterion"] == "AUPRO@30%"


def test_the_real_judge_keeps_the_better_localising_variant(tiny_root):
    det = Detector(_config()).fit(_category(tiny_root), progress=False)
    for b in det.core.branches:
        info = det.report.bank_scale[b.name]
        assert 0.0 <= info["plain"] <= 1.0 and 0.0 <= info["scaled"] <= 1.0
        assert info["kept"] == (info["scaled"] > info["plain"])
        assert (b.local_scale is not None) == info["kept"]


def test_unchecked_and_plain_banks_paste_nothing_and_measure_nothing(tiny_root, monkeypatch):
    def never(*a):  # noqa: ANN002, ANN202
        raise AssertionError("the judge was asked")
    monkeypatch.setattr("cmad.pipeline.aupro_inside", never)
    cat = _category(tiny_root)
    # with weights: auto the defects are pasted, but an unchecked model does not judge
    unchecked = Detector(_config(bank_density_check=False, weights="auto")).fit(cat, progress=False)
    assert unchecked.report.bank_scale == {}
    assert all(b.local_scale is not None for b in unchecked.core.branches)
    plain = Detector(_config(bank_density=None)).fit(cat, progress=False)
    assert plain.report.bank_scale == {} and all(b.local_scale is None for b in plain.core.branches)
    # only the check (or weights: auto) pastes defects into the validation normals
    val = plain.prepare(cat.samples("validation")[:2])
    assert len(plain.calibration(val, ["rgb", "xyz"])) == 2
    assert len(Detector(_config()).calibration(val, ["rgb", "xyz"])) > 2
    assert not _config(bank_density=None).pastes_defects
    assert _config(bank_density=None, weights="auto").pastes_defects
    assert not _config(bank_density_check=False).pastes_defects


def test_no_pasted_defect_keeps_the_scale_with_a_warning(tiny_root, monkeypatch, caplog):
    def never(*a):  # noqa: ANN002, ANN202
        raise AssertionError("the judge was asked")
    monkeypatch.setattr("cmad.pipeline.aupro_inside", never)
    det = Detector(_config(calib_per_sample=0)).fit(_category(tiny_root), progress=False)
    assert all(b.local_scale is not None for b in det.core.branches)
    assert "no pasted defects" in caplog.text


def test_a_saved_config_without_the_field_was_fitted_unchecked():
    d = DetectorConfig().to_dict()
    assert d["bank_density_check"] is True
    del d["bank_density_check"]
    assert DetectorConfig.from_saved(d).bank_density_check is False
    assert DetectorConfig.from_dict(d).bank_density_check is True
    with pytest.raises(Exception, match="bank_density_check"):
        DetectorConfig(bank_density_check="yes")


def test_a_scale_of_the_wrong_length_is_refused(tiny_root):
    det = Detector(_config(bank_density_check=False)).fit(_category(tiny_root), progress=False)
    b = det.core.branches[0]
    with pytest.raises(ValueError, match="scales for"):
        b.set_local_scale(torch.ones(b.bank_entries + 1))


def test_aupro_inside_crops_each_map_to_its_image():
    rng = np.random.default_rng(0)
    gts = [np.zeros((8, 8), bool) for _ in range(3)]
    for g in gts:
        g[2:4, 3:5] = True
    maps = [rng.random((8, 8)) for _ in range(3)]
    areas = [np.zeros((8, 8), bool) for _ in range(3)]
    for a in areas:
        a[1:7, :] = True   # rows 0 and 7: padding
    for m in maps:
        m[0] = m[7] = 5.0  # padding scored high: counted, it would cost AUPRO
    crop = aupro([g[1:7] for g in gts], [m[1:7] for m in maps])
    assert aupro_inside(gts, maps, areas) == pytest.approx(crop)
    assert aupro_inside(gts, maps, areas) > aupro(gts, maps)
    with pytest.raises(ValueError, match="areas"):
        aupro_inside(gts, maps, areas[:2])
