"""Memory-bank branches: a patch far from every stored normal patch is anomalous.

- `rgb_bank`: CNN features of the RGB image (intra-modal, appearance)
- `xyz_bank`: FPFH (intra-modal, shape), on patches that have FPFH
- `joint_bank`: RGB and FPFH features concatenated, each modality scaled to unit spread,
  FPFH zero where a patch has none: a patch is normal only if its appearance and its shape
  were seen together on normal parts (cross-modal co-occurrence). The BTF baseline is this
  bank with a 10% float32 coreset.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmad.features import FeatureMaps
from cmad.model.bank import MemoryBank
from cmad.model.branch import Branch, flat


class BankBranch(Branch):
    """A coreset memory bank over one patch-feature matrix; subclasses say which."""

    stage = "bank_search"
    # the coreset: seeded generators of its own, numba on one core without the GIL
    fit_in_thread = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bank: MemoryBank | None = None

    def fraction(self) -> float:
        return self.config.bank_fraction

    def rows(self, fm: FeatureMaps) -> torch.Tensor:
        """(B*h*w, C) features of every patch."""
        return flat(fm[self.needs[0]])

    def where(self, fm: FeatureMaps) -> torch.Tensor:
        """(B, h, w) patches the bank is fitted on and scores."""
        return fm.image

    def fit(self, train: FeatureMaps, val: FeatureMaps, progress: bool = False) -> None:
        cfg = self.config
        feats = self.rows(train)[self.where(train).reshape(-1)]
        if feats.shape[0] == 0:
            raise ValueError(f"{self.name}: no training patches")
        self.bank = MemoryBank(self.fraction(), cfg.bank_max_entries, cfg.seed,
                               min_entries=cfg.bank_min_entries, pca_dim=cfg.bank_pca,
                               dtype=cfg.bank_dtype, density_k=cfg.bank_density
                               ).fit(feats, progress=progress)
        self.info = {"entries": self.bank.entries, "train_patches": int(feats.shape[0])}

    def score(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError(f"{self.name}: score called before fit")
        b, h, w = fm.valid.shape
        where = self.where(fm)
        keep = where.reshape(-1)
        rows = self.rows(fm)
        # only the patches the branch scores are searched (the normalisation replaces the
        # others): the padding of a non-square image was a quarter of a 4:3 image's search
        out = torch.zeros(rows.shape[0], dtype=torch.float32)
        if bool(keep.any()):
            out[keep] = self.bank.score(rows[keep])
        return out.reshape(b, h, w), where

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError(f"{self.name}: not fitted")
        return self.bank.state_dict()

    def export_module(self) -> nn.Module:
        if self.bank is None:
            raise RuntimeError(f"{self.name}: not fitted")
        return _BankGraph(self)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.bank = MemoryBank(self.fraction(), self.config.bank_max_entries, self.config.seed)
        self.bank.load_state_dict(tensors)

    @property
    def local_scale(self) -> torch.Tensor | None:
        """(K,) the entries' local scales, or None where the bank scores plain distances."""
        return None if self.bank is None else self.bank.stored.get("scale")

    def set_local_scale(self, scale: torch.Tensor | None) -> None:
        """Score over `scale` (one per entry), or plain distances with None."""
        if self.bank is None:
            raise RuntimeError(f"{self.name}: not fitted")
        if scale is None:
            self.bank.stored.pop("scale", None)
        elif scale.shape != (self.bank.entries,):
            raise ValueError(f"{self.name}: {tuple(scale.shape)} scales for "
                             f"{self.bank.entries} entries")
        else:
            self.bank.stored["scale"] = scale

    @property
    def bank_entries(self) -> int:
        return 0 if self.bank is None else self.bank.entries

    @property
    def bank_bytes(self) -> int:
        return 0 if self.bank is None else self.bank.nbytes


class RGBBank(BankBranch):
    name = "rgb_bank"
    display = "RGB bank"
    needs = ("rgb",)
    panel = "rgb-bank"


class XYZBank(BankBranch):
    name = "xyz_bank"
    display = "3D bank"
    needs = ("xyz",)
    panel = "3d-bank"

    def where(self, fm: FeatureMaps) -> torch.Tensor:
        return fm.mask3d()


class JointBank(BankBranch):
    name = "joint_bank"
    display = "joint bank"
    needs = ("rgb", "xyz")
    cross_modal = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.scale = (1.0, 1.0)

    def fraction(self) -> float:
        return self.config.joint_fraction

    def rows(self, fm: FeatureMaps) -> torch.Tensor:
        xyz = fm["xyz"] * fm.xyz_valid[:, None].float()
        return flat(torch.cat([fm["rgb"] / self.scale[0], xyz / self.scale[1]], 1))

    def fit(self, train: FeatureMaps, val: FeatureMaps, progress: bool = False) -> None:
        self.scale = (float(train["rgb"].std()), float(train["xyz"].std()))
        super().fit(train, val, progress)

    def meta(self) -> dict[str, Any]:
        return {"scale": list(self.scale)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.scale = (float(meta["scale"][0]), float(meta["scale"][1]))
        super().load_state_dict(tensors, meta)


class GeomBank(BankBranch):
    """Geometry rendered as an image, through the RGB CNN: a 3D bank the CNN can read."""

    name = "geom_bank"
    display = "geometry bank"
    needs = ("geom",)
    panel = "3d-bank"

    def where(self, fm: FeatureMaps) -> torch.Tensor:
        return fm.valid & fm.image


class _BankGraph(nn.Module):
    """`BankBranch.score` for ONNX export: the branch's own `rows` and `where`, the bank's
    `BankSearch`. It searches every patch (a graph of fixed shape); outside `where` its
    values differ from the torch branch's zeros, and the normalisation replaces both."""

    def __init__(self, branch: BankBranch) -> None:
        super().__init__()
        self.branch = branch
        self.search = branch.bank.export_module()

    def forward(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = fm.grid
        return self.search(self.branch.rows(fm)).reshape(-1, h, w), self.branch.where(fm)
