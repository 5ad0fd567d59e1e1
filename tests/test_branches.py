"""The Branch shape: the detector loops over registered branches and never asks their kind."""
import numpy as np
import pytest
import torch

from cmad.data.mvtec3d import Dataset
from cmad.model.branch import Branch
from cmad.model.branches import REGISTRY
from cmad.model.config import DetectorConfig
from cmad.pipeline import Detector


class BrightnessBranch(Branch):
    """A toy branch: how far a patch's mean colour is from the training mean."""

    name = "toy_brightness"
    display = "toy"
    needs = ("colour",)
    panel = "rgb-bank"

    def fit(self, train, val, progress=False):
        self.mean = train["colour"][:, :3].mean(dim=(0, 2, 3))

    def score(self, fm):
        d = (fm["colour"][:, :3] - self.mean[None, :, None, None]).abs().sum(1)
        return d, fm.image

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, tensors, meta):
        self.mean = tensors["mean"]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, BrightnessBranch.name, BrightnessBranch)
    yield


def test_a_new_branch_is_one_class_and_one_registry_entry(toy_registered, tiny_root, tmp_path):
    cat = Dataset(tiny_root).category(Dataset(tiny_root).categories[0])
    cfg = DetectorConfig(size=64, branches=("toy_brightness", "rgb_bank"), bank_min_entries=16)
    det = Detector(cfg).fit(cat, progress=False)
    assert det.branches == ("toy_brightness", "rgb_bank")
    # only the features the branches need are extracted: no FPFH for an RGB-only model
    assert set(det.extractor.needs) == {"colour", "rgb"}
    test = cat.samples("test")[:3]
    preds, timings = det.predict_timed(test)
    assert "xyz_features" not in timings and "colour_stats" in timings
    assert set(preds[0].branch_maps) == {"toy_brightness", "rgb_bank"}
    loaded = Detector.load(det.save(tmp_path / "m"))
    assert [p.score for p in loaded.predict(test)] == [p.score for p in preds]


def test_every_registered_branch_declares_its_shape():
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.display and cls.panel in ("cross-modal", "rgb-bank", "3d-bank")
        needs = cls.needs_for(DetectorConfig())
        assert needs and all(isinstance(n, str) for n in needs)


def test_branch_scores_have_the_batch_grid_shape(tiny_root):
    cat = Dataset(tiny_root).category(Dataset(tiny_root).categories[0])
    det = Detector(DetectorConfig(size=64, bank_min_entries=16,
                                  align=DetectorConfig().align.__class__(variant="latent",
                                                                         hidden=16, epochs=2)))
    det.fit(cat, progress=False)
    prep = det.prepare(cat.samples("test")[:2])
    fm, _ = det.extractor.extract(prep)
    raw, ms = det.core.branch_scores(fm)
    for name, (s, v) in raw.items():
        assert s.shape == v.shape == (2, 8, 8), name
        assert v.dtype == torch.bool and torch.isfinite(s).all()
    assert set(ms) == {REGISTRY[b].stage for b in det.branches}
    assert np.all(np.array(list(ms.values())) >= 0)


class LocatingBranch(BrightnessBranch):
    """A toy branch whose score also gives a localisation map: always the top-left patch."""

    name = "toy_locating"
    gives_map = True

    def score(self, fm):
        d, where = super().score(fm)
        loc = torch.zeros_like(d)
        loc[:, 0, 0] = 1.0 + torch.arange(len(d), dtype=d.dtype)
        return d, where, loc


def test_a_localisation_map_makes_the_pixel_map_and_the_scores_stay(monkeypatch, tiny_root,
                                                                     tmp_path):
    monkeypatch.setitem(REGISTRY, LocatingBranch.name, LocatingBranch)
    monkeypatch.setitem(REGISTRY, BrightnessBranch.name, BrightnessBranch)
    cat = Dataset(tiny_root).category(Dataset(tiny_root).categories[0])
    test = cat.samples("test")[:4]
    plain = Detector(DetectorConfig(size=64, branches=("toy_brightness",))).fit(cat, progress=False)
    det = Detector(DetectorConfig(size=64, branches=("toy_locating",))).fit(cat, progress=False)
    assert "toy_locating@map" in det.core.norm
    p_plain, preds = plain.predict(test), det.predict(test)
    # the image score is read from the scores, as without a localisation map
    assert [p.score for p in preds] == pytest.approx([p.score for p in p_plain], rel=1e-6)
    for p in preds:
        h, w = p.anomaly_map.shape
        peak = np.unravel_index(np.argmax(p.anomaly_map), p.anomaly_map.shape)
        assert peak[0] < h // 4 and peak[1] < w // 4  # the map is the localisation map's
        assert set(p.branch_maps) == {"toy_locating"}
        assert np.array_equal(np.argmax(p.branch_maps["toy_locating"]), np.argmax(p.anomaly_map))
    loaded = Detector.load(det.save(tmp_path / "m"))
    again = loaded.predict(test)
    assert [p.score for p in again] == [p.score for p in preds]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(again, preds))


def test_a_nll_mapping_model_without_its_map_normalisation_is_refused(tiny_models, tmp_path):
    import json
    import shutil

    from cmad.errors import ModelFormatError

    model = tmp_path / "m"
    shutil.copytree(tiny_models[0], model)
    meta = json.loads((model / "config.json").read_text())
    assert meta["config"]["mapping"]["loss"] == "nll" and "mapping@map" in meta["norm"]
    Detector.load(model)  # loads as saved
    del meta["norm"]["mapping@map"]
    (model / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="mapping@map"):
        Detector.load(model)


def test_a_bank_searches_only_the_patches_it_scores(tiny_root, monkeypatch):
    """Padding patches are not searched, and every scored patch gets the full search's value."""
    import dataclasses

    from cmad.model.bank import MemoryBank

    cat = Dataset(tiny_root).category(Dataset(tiny_root).categories[0])
    det = Detector(DetectorConfig(size=64, branches=("rgb_bank", "joint_bank"),
                                  bank_min_entries=16)).fit(cat, progress=False)
    fm, _ = det.extractor.extract(det.prepare(cat.samples("test")[:3]))
    image = fm.image.clone()
    image[:, :, -3:] = False  # as the padding of a wide image
    image[1] = False  # a sample with no image patch at all
    fm = dataclasses.replace(fm, image=image)
    searched = []
    search = MemoryBank.score
    monkeypatch.setattr(MemoryBank, "score",
                        lambda self, q: searched.append(q.shape[0]) or search(self, q))
    for name in ("rgb_bank", "joint_bank"):
        branch = next(b for b in det.core.branches if b.name == name)
        searched.clear()
        s, where = branch.score(fm)
        assert torch.equal(where, image) and searched == [int(image.sum())]
        full = search(branch.bank, branch.rows(fm)).reshape(s.shape)
        assert torch.equal(s[where], full[where]), name
        searched.clear()
        s, where = branch.score(dataclasses.replace(fm, image=torch.zeros_like(image)))
        assert searched == [] and not where.any() and s.shape == image.shape
