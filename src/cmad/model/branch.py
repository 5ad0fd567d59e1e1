"""The shape every branch has: what features it needs, how it fits, scores and saves.

A branch turns patch features into one raw anomaly score per patch (higher = more
anomalous) and says which patches its score is defined on. The detector core loops over a
list of branches and never asks which kind a branch is. Adding a branch is one file in
`cmad.model.branches` plus one line in its registry.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from cmad.errors import ConfigError
from cmad.features import FeatureMaps, modalities_of

if TYPE_CHECKING:
    from cmad.model.config import DetectorConfig


class _HalfLinear(nn.Module):
    """`nn.Linear` with its weights kept as float16 constants, computed in float32."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", lin.weight.detach().half())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x, self.weight.float(), b)


def half_stored(net: nn.Module) -> nn.Module:
    """A copy of `net` for export whose linear layers store float16 weights, when every
    weight is already a float16 value (`round_to_float16`): the same function at half the
    bytes in an ONNX file. Otherwise the copy keeps float32."""
    lins = [m for m in net.modules() if isinstance(m, nn.Linear)]
    exact = all(torch.equal(t, t.half().float()) for m in lins for t in m.parameters())
    net = copy.deepcopy(net)
    if not exact:
        return net

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, _HalfLinear(child))
            else:
                swap(child)

    swap(net)
    return net


def flat(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class Branch(ABC):
    """One anomaly-scoring branch.

    Class attributes: `name` (the registry key used in configs), `display` (tables and
    panels), `needs` (feature names, see `cmad.features`), `cross_modal` (True when the
    branch scores how the two modalities relate), `stage` (the timing stage its scoring is
    charged to), `panel` (the report panel column it is drawn in: "cross-modal",
    "rgb-bank" or "3d-bank"), `fit_in_thread` (True when `fit` may run in a worker thread
    beside other branches' fits: it draws no numbers from torch's global generator and
    its result does not depend on the thread count; the memory banks' coresets, one core
    each, then overlap the mapping's training and each other).
    """

    name: ClassVar[str]
    display: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    cross_modal: ClassVar[bool] = False
    stage: ClassVar[str] = "bank_search"
    panel: ClassVar[str] = "cross-modal"
    fit_in_thread: ClassVar[bool] = False

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.info: dict[str, Any] = {}

    @classmethod
    def needs_for(cls, config: DetectorConfig) -> tuple[str, ...]:
        """The features this branch needs under `config` (the class's `needs` by default)."""
        return cls.needs

    @classmethod
    def modalities(cls, config: DetectorConfig) -> set[str]:
        return modalities_of(cls.needs_for(config))

    @abstractmethod
    def fit(self, train: FeatureMaps, val: FeatureMaps, progress: bool = False) -> None:
        """Fit on normal training patches; `val` holds normal validation samples only."""

    @abstractmethod
    def score(self, fm: FeatureMaps) -> tuple[torch.Tensor, ...]:
        """Raw (B, h, w) patch scores and the (B, h, w) patches where they are defined;
        optionally a third (B, h, w) map, the branch's localisation map: normalised on its
        own, it stands for the branch in the fused pixel map, while the image score reads
        the scores (the mapping with `loss: nll`; `DetectorCore`, key suffix `LOC`). A
        branch that gives one says so in `gives_map`."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to save (safetensors)."""

    @abstractmethod
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore from `state_dict()` tensors and `meta()`."""

    def meta(self) -> dict[str, Any]:
        """JSON-able settings learnt in fitting that are not tensors."""
        return {}

    def export_module(self) -> nn.Module:
        """An `nn.Module` whose `forward(fm: FeatureMaps)` gives what `score(fm)` gives, with
        torch operations that export to ONNX (`cmad export`; the fitted tensors become
        constants of the graph). Branches that cannot be exported keep this default."""
        raise ConfigError(f"branch {self.name!r} cannot be exported to ONNX (it defines no "
                          "export_module); use the torch runtime for this model")

    @property
    def bank_entries(self) -> int:
        return 0

    @property
    def bank_bytes(self) -> int:
        return 0

    @property
    def gives_map(self) -> bool:
        """True when `score` gives a localisation map as its third output."""
        return False
