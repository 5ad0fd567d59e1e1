"""`mapping`: the dense cross-modal mapping (see `cmad.model.mapping`) as a branch.

The RGB CNN features of a patch and the CNN features of the same patch of the rendered
geometry (`mapping_b`: "geom", optionally with "xyz", FPFH) predict each other on normal
parts; the score is how badly each is predicted from the other, divided (with the default
`mapping.loss: nll`) by the variance the MLPs predict for their own error on the patch; the
plain errors are the branch's localisation map. Defined on patches on the part (enough
foreground).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from cmad.features import FeatureMaps
from cmad.model.branch import Branch, flat, half_stored
from cmad.model.mapping import CrossModalMapping


class MappingBranch(Branch):
    name = "mapping"
    display = "cross-modal mapping"
    needs = ("rgb", "geom")
    cross_modal = True
    stage = "mapping"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model: CrossModalMapping | None = None

    @classmethod
    def needs_for(cls, config) -> tuple[str, ...]:
        return ("rgb", *config.mapping_b)

    def _inputs(self, fm: FeatureMaps) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.cat([fm[n] if n != "xyz" else fm[n] * fm.xyz_valid[:, None].float()
                       for n in self.config.mapping_b], 1)
        return flat(fm["rgb"]), flat(b)

    def where(self, fm: FeatureMaps) -> torch.Tensor:
        return fm.valid & fm.image

    def fit(self, train: FeatureMaps, val: FeatureMaps, progress: bool = False) -> None:
        cfg = self.config
        mask, vmask = self.where(train).reshape(-1), self.where(val).reshape(-1)
        a, b = self._inputs(train)
        va, vb = self._inputs(val)
        self.model = CrossModalMapping(replace(cfg.mapping, seed=cfg.seed))
        self.model.fit(a[mask], b[mask], va[vmask], vb[vmask], progress=progress)
        if cfg.align_float16:
            self.model.round_to_float16()
        self.info = {"epochs": len(getattr(self.model, "history", []))}

    def score(self, fm: FeatureMaps) -> tuple[torch.Tensor, ...]:
        """(scores, where), and with `mapping.loss: nll` a third map, the plain errors,
        which the fused pixel map uses (the scores are the errors over their predicted
        variance, for detection)."""
        if self.model is None:
            raise RuntimeError("mapping: score called before fit")
        return self.outputs(*self.model.score_pair(*self._inputs(fm)), self.where(fm))

    @property
    def gives_map(self) -> bool:
        return self.config.mapping.loss == "nll"

    def outputs(self, det: torch.Tensor, loc: torch.Tensor, where: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """`score`'s result from flat detection and localisation scores: (B, h, w) maps."""
        shape = (-1, int(where.shape[1]), int(where.shape[2]))  # the batch stays free in ONNX
        if not self.gives_map:
            return det.reshape(shape), where
        return det.reshape(shape), where, loc.reshape(shape)

    def export_module(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("mapping: not fitted")
        return _MappingGraph(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("mapping: not fitted")
        return self.model.state_dict(half=self.config.align_float16)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.model = CrossModalMapping(replace(self.config.mapping, seed=self.config.seed))
        self.model.load_state_dict(tensors)


class _MappingGraph(nn.Module):
    """`MappingBranch.score` for ONNX export: the model's own standardisation and error
    functions; its fitted tensors become constants of the graph."""

    def __init__(self, branch: MappingBranch) -> None:
        super().__init__()
        self.branch = branch
        self.net = half_stored(branch.model.net)

    def forward(self, fm: FeatureMaps) -> tuple[torch.Tensor, ...]:
        m = self.branch.model
        za, zb = m._standardise(*self.branch._inputs(fm))
        det, loc = m.combine(m._pair_errors(self.net, za, zb, weighted=True))
        return self.branch.outputs(det, loc, self.branch.where(fm))
