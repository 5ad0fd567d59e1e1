"""`align`: the learned cross-modal alignment (see `cmad.model.align`) as a branch.

Appearance (`align_app`: per-patch colour statistics and/or CNN features) and geometry
(`align_geo`: FPFH and/or geometric context) of the same patch are related on normal parts;
the score is how far each is from what the other predicts. Defined on patches with 3D.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cmad.features import FeatureMaps
from cmad.model.align import CrossModalAlignment
from cmad.model.branch import Branch, flat, half_stored


class AlignBranch(Branch):
    name = "align"
    display = "alignment"
    needs = ("colour", "xyz", "context")
    cross_modal = True
    stage = "alignment"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model: CrossModalAlignment | None = None

    @classmethod
    def needs_for(cls, config) -> tuple[str, ...]:
        return tuple(config.align_app) + tuple(config.align_geo)

    def _inputs(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        app = torch.cat([fm[n] for n in self.config.align_app], 1)
        geo = torch.cat([fm[n] for n in self.config.align_geo], 1)
        return flat(app), flat(geo)

    def fit(self, train: FeatureMaps, val: FeatureMaps, progress: bool = False) -> None:
        cfg = self.config
        mask, vmask = train.mask3d().reshape(-1), val.mask3d().reshape(-1)
        app, geo = self._inputs(train)
        vapp, vgeo = self._inputs(val)
        self.model = CrossModalAlignment(cfg.align, seed=cfg.seed)
        self.model.fit(app[mask], geo[mask], vapp[vmask], vgeo[vmask], progress=progress)
        if cfg.align_float16:
            self.model.round_to_float16()
        self.info = {"epochs": len(self.model.history),
                     "history": [list(h) for h in self.model.history]}

    def score(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("align: score called before fit")
        b, h, w = fm.valid.shape
        return self.model.score(*self._inputs(fm)).reshape(b, h, w), fm.mask3d()

    def export_module(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("align: not fitted")
        return _AlignGraph(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("align: not fitted")
        return self.model.state_dict(half=self.config.align_float16)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.model = CrossModalAlignment(self.config.align, seed=self.config.seed)
        self.model.load_state_dict(tensors)


class _AlignGraph(nn.Module):
    """`AlignBranch.score` for ONNX export: the fitted network and statistics as constants."""

    def __init__(self, branch: AlignBranch) -> None:
        super().__init__()
        m = branch.model
        self.branch = branch
        self.net = half_stored(m.net)
        for name in ("app_mean", "app_std", "geo_mean", "geo_std"):
            self.register_buffer(name, getattr(m, name).float())
        self.weighted = m.w_app is not None and m.w_geo is not None
        if self.weighted:
            self.register_buffer("w_app", m.w_app.float())
            self.register_buffer("w_geo", m.w_geo.float())

    def forward(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = fm.grid
        app, geo = self.branch._inputs(fm)
        a = (app.float() - self.app_mean) / self.app_std
        g = (geo.float() - self.geo_mean) / self.geo_std
        wa, wg = (self.w_app, self.w_geo) if self.weighted else (None, None)
        return self.net.loss_terms(a, g, wa, wg).reshape(-1, h, w), fm.mask3d()
