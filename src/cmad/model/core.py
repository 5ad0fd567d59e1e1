"""The detector core: branches fitted on patch features, their maps fused into one.

Pure: features in, maps and scores out; no files, no preprocessing, no progress state kept
between calls (timings are returned as values). `cmad.pipeline.Detector` feeds it.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmad.errors import ConfigError
from cmad.features import FeatureMaps, pool_cells
from cmad.model.branch import Branch
from cmad.model.branches import REGISTRY, branch_class
from cmad.model.config import DetectorConfig
from cmad.model.decision import Decision
from cmad.model.fusion import (
    PixelMaps,
    choose_weights,
    combine,
    image_scores,
    normalise,
    rank_auc,
    robust_stats,
    upsample,
)
from cmad.runtime import thread_limit

log = logging.getLogger(__name__)


THREE_D_DEFAULT = ("geom_bank",)
# judge(gt, maps, area) -> how well (B, S, S) maps localise the gt (B, S, S) inside area
Judge = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def active_branches(branches: Sequence[str], modalities: Sequence[str],
                    config: DetectorConfig | None = None) -> tuple[str, ...]:
    """The branches whose features these modalities (rgb and/or xyz) provide.

    The default branches all need RGB; on 3D-only data the default model is the geometry
    bank instead (`THREE_D_DEFAULT`), which reads the cloud alone."""
    cfg = config or DetectorConfig()
    out = tuple(b for b in branches if branch_class(b).modalities(cfg) <= set(modalities))
    if not out and tuple(branches) == DetectorConfig().branches and set(modalities) == {"xyz"}:
        out = THREE_D_DEFAULT
    return out


def feature_needs(config: DetectorConfig, modalities: Sequence[str]) -> set[str]:
    """The union of the features the runnable branches of `config` need."""
    need: set[str] = set()
    for b in active_branches(config.branches, modalities, config):
        need |= set(branch_class(b).needs_for(config))
    return need


def scheme_weights(branches: Sequence[str], scheme: str) -> dict[str, float]:
    """Fixed fusion weights (summing to 1) for 'equal' or 'joint' (cross-modal banks half)."""
    joint = [b for b in branches if b == "joint_bank"]
    if scheme == "joint" and joint and len(joint) < len(branches):
        rest = len(branches) - len(joint)
        return {b: (0.5 / len(joint) if b in joint else 0.5 / rest) for b in branches}
    return {b: 1.0 / len(branches) for b in branches}


@dataclass
class FitReport:
    """What fitting did: sizes, times, chosen weights, calibration criteria."""

    n_train: int = 0
    n_val: int = 0
    fit_s: float = 0.0
    bank_entries: dict[str, int] = field(default_factory=dict)
    # bank -> {"scaled": value, "plain": value, "kept": bool, "criterion": "AUPRO@30%" or
    # "image AUROC"} (`bank_density_check`)
    bank_scale: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    single_branch_criterion: dict[str, float] = field(default_factory=dict)
    branch_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    branch_fit_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Scored:
    """Scores of a batch: image scores (B,), fused pixel maps (B, S, S) at working
    resolution (the padding set to each map's floor), per-branch standardised pixel maps,
    and the ms per sample of each stage."""

    scores: np.ndarray
    maps: np.ndarray
    branch_maps: dict[str, np.ndarray]
    timings_ms: dict[str, float]


class DetectorCore:
    """Branches + per-branch normalisation + fusion weights + the pass/fail `Decision`."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.modalities: list[str] = []
        self.branches: list[Branch] = []
        self.norm: dict[str, tuple[float, float]] = {}
        self.weights: dict[str, float] = {}
        self.decision: Decision = Decision(threshold=float("inf"), pixel_threshold=float("inf"))

    @property
    def threshold(self) -> float:
        """The image-score threshold: a score above it is anomalous."""
        return self.decision.threshold

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    @property
    def needs(self) -> set[str]:
        out: set[str] = set()
        for b in self.branches:
            out |= set(b.needs_for(self.config))
        return out

    def _build(self, modalities: Sequence[str]) -> None:
        names = active_branches(self.config.branches, modalities, self.config)
        if not names:
            raise ConfigError(f"none of the branches {list(self.config.branches)} can run on "
                              f"modalities {list(modalities)}")
        self.modalities = list(modalities)
        self.branches = [REGISTRY[n](self.config) for n in names]

    @property
    def map_weights(self) -> dict[str, float] | None:
        """Weights of the pixel map when `config.map_exclude` leaves some weighted branch
        out of it; None: the map is the score's fusion."""
        return map_weights(self.weights, self.config.map_exclude)

    def _pixels(self, maps: dict[str, torch.Tensor], weights: dict[str, float]) -> np.ndarray:
        """The weighted sum of normalised patch maps, upsampled and blurred."""
        return upsample(combine(maps, weights), self.config.size, self.config.sigma)

    # ---------------------------------------------------------------- fitting
    def fit(self, train: FeatureMaps, calib: FeatureMaps, labels: np.ndarray, gt: np.ndarray,
            area: np.ndarray, modalities: Sequence[str], progress: bool = False,
            judge: Judge | None = None) -> FitReport:
        """Fit every branch on `train` (normal patches), then normalise and fuse on `calib`:
        validation normals (label 0) and, where the config pastes defects, copies with
        pasted defects (label 1, `gt` their (B, S, S) masks). `area`: (B, S, S) pixels
        inside each image. `judge(gt, maps, area)`: how well (B, S, S) pixel maps localise
        the pasted defects (higher is better), for `bank_density_check`; without it, or
        without pasted defects, every bank keeps its local scale."""
        cfg = self.config
        report = FitReport()
        self._build(modalities)
        normal = torch.from_numpy(np.asarray(labels) == 0)
        if not bool(normal.any()):
            raise ConfigError("no normal validation samples to normalise the branches on")
        val = calib.select(normal)
        if any("xyz" in b.needs_for(cfg) for b in self.branches) and not bool(train.mask3d().any()):
            raise ConfigError(
                "no valid 3D patches in the training data: no patch has enough foreground "
                "points with FPFH neighbours. Check that the point clouds are in metres, that "
                "background removal keeps the part (preprocess.plane_threshold), and the FPFH "
                "radii (xyz.feature_radius) for this scale.")
        self._fit_branches(train, val, report, progress)
        known: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cfg.bank_density_check and judge is not None:
            if bool(normal.all()):
                if any(getattr(b, "local_scale", None) is not None for b in self.branches):
                    log.warning("no pasted defects to check the banks' local scale on "
                                "(calib_per_sample %d): every bank keeps it unchecked",
                                cfg.calib_per_sample)
            else:
                report.bank_scale, known = self._check_local_scales(calib, normal, gt, area,
                                                                    judge)
        raw, _ = self.branch_scores(calib, known)
        self.norm = {n: robust_stats(s[normal], v[normal]) for n, (s, v) in raw.items()}
        maps = {n: normalise(s, v, *self.norm[n]) for n, (s, v) in raw.items()}
        names = self.names
        if isinstance(cfg.weights, dict):
            self.weights = {n: float(cfg.weights.get(n, 0.0)) for n in names}
        elif cfg.weights in ("equal", "joint") or len(names) == 1:
            self.weights = scheme_weights(names, cfg.weights)
        else:
            grid = calib.grid
            gt_patch = torch.from_numpy(np.stack(
                [pool_cells(g.astype(np.float32)[..., None], grid)[..., 0] >= 0.25 for g in gt]))
            self.weights, report.single_branch_criterion = choose_weights(
                {n: maps[n] for n in names}, gt_patch, calib.image, np.asarray(labels))
        if not any(self.weights.values()):
            raise ConfigError(f"all active branches {list(names)} have weight 0")
        report.weights = dict(self.weights)
        a_norm = area[normal.numpy()]
        scores, pix_map = self.fuse({n: m[normal] for n, m in maps.items()}, a_norm)
        self.decision = Decision.from_normals(scores, pix_map, a_norm, fpr=cfg.fpr,
                                              pixel_fpr=cfg.pixel_fpr)
        report.bank_entries = {b.name: b.bank_entries for b in self.branches if b.bank_entries}
        return report

    def _check_local_scales(self, calib: FeatureMaps, normal: torch.Tensor, gt: np.ndarray,
                            area: np.ndarray, judge: Judge
                            ) -> tuple[dict[str, dict[str, Any]],
                                       dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Keep each bank's local scale only where its own map, normalised on the
        validation normals, does better with it than with the plain distance (a tie drops
        it: plain is simpler and searches faster): localises the pasted defects better
        (`judge`), or, for a bank left out of the map (`map_exclude`, which counts toward
        the image score only), ranks the pasted copies above the normals better (image
        AUROC of its image score, `score_mode`). Returns what was measured per bank and the
        raw `calib` scores of what was kept. Out of the map is read from the names: with
        weights that leave every other branch at 0 the bank would be in the map after all
        (`map_weights`), though judged as out of it."""
        cfg = self.config
        labels = (~normal).numpy()
        # the branches the map leaves out (weights not chosen yet: as if all equal)
        in_map = map_weights(dict.fromkeys(self.names, 1.0), cfg.map_exclude)
        out_of_map = set() if in_map is None else set(self.names) - set(in_map)
        out: dict[str, dict[str, Any]] = {}
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for b in self.branches:
            scale = getattr(b, "local_scale", None)
            if scale is None:
                continue
            by_image = b.name in out_of_map
            got, raws = {}, {}
            for name, s in (("scaled", scale), ("plain", None)):
                b.set_local_scale(s)
                raw, valid = raws[name] = b.score(calib)[:2]
                m = normalise(raw, valid, *robust_stats(raw[normal], valid[normal]))
                pix = upsample(m, cfg.size, cfg.sigma)
                got[name] = (rank_auc(labels, image_scores(pix, area, cfg.score_mode, cfg.topk))
                             if by_image else float(judge(gt, pix, area)))
            keep = got["scaled"] > got["plain"]
            b.set_local_scale(scale if keep else None)
            kept[b.name] = raws["scaled" if keep else "plain"]
            what = "image AUROC" if by_image else "AUPRO@30%"
            out[b.name] = {**got, "kept": keep, "criterion": what}
            log.info("%s: local scale %s (%s on pasted defects %.4f with it, %.4f without)",
                     b.name, "kept" if keep else "dropped", what, got["scaled"], got["plain"])
        return out, kept

    def _fit_branches(self, train: FeatureMaps, val: FeatureMaps, report: FitReport,
                      progress: bool) -> None:
        """Fit every branch. Those with `fit_in_thread` (the banks' coresets) wait in a queue
        that worker threads (one fewer than the thread limit, at most one per branch) and
        this thread, once it has fitted the others, take from in order, so that no core
        idles while a coreset is left (one thread in all when the limit is 1). Each
        branch's fit is the same whichever thread runs it (none depends on the thread
        count); torch's thread count is restored after."""
        def fit_one(b: Branch) -> None:
            t = time.perf_counter()
            b.fit(train, val, progress=progress)
            report.branch_fit_s[b.name] = time.perf_counter() - t

        side = [b for b in self.branches if b.fit_in_thread]
        here = [b for b in self.branches if not b.fit_in_thread]
        limit = thread_limit() or torch.get_num_threads()
        threads = torch.get_num_threads()
        if limit < 2 or not side or (not here and len(side) < 2):
            for b in self.branches:
                fit_one(b)
        else:
            queue = list(side)
            lock = threading.Lock()

            def run(own: Sequence[Branch]) -> None:
                """Fit `own`, then banks from the queue until it is empty."""
                try:
                    for b in own:
                        fit_one(b)
                    while True:
                        with lock:
                            if not queue:
                                return
                            b = queue.pop(0)
                        fit_one(b)
                except BaseException:
                    with lock:   # after an error, no thread starts another bank
                        queue.clear()
                    raise

            workers = min(len(side), limit - 1)
            # every lane on one torch thread (the mapping trains on one anyway): every
            # set-and-restore of the thread count inside a fit then reads and restores 1
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmad-fit") as pool:
                    done = [pool.submit(run, ()) for _ in range(workers)]
                    run(here)
                    for f in done:
                        f.result()
            finally:
                torch.set_num_threads(threads)
        for b in self.branches:
            report.branch_info[b.name] = dict(b.info)

    # ---------------------------------------------------------------- scoring
    def branch_scores(self, fm: FeatureMaps,
                      known: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """Raw (B, h, w) patch scores and validity of each branch (and of a branch's
        localisation map, under its name + LOC), and ms per sample by stage. `known`: the
        scores of some branches (without a localisation map) on `fm`, already computed."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ms: dict[str, float] = {}
        n = max(len(fm), 1)
        for b in self.branches:
            if known and b.name in known and not b.gives_map:
                out[b.name] = known[b.name]
                continue
            t = time.perf_counter()
            res = b.score(fm)
            if (len(res) > 2) != b.gives_map:
                raise RuntimeError(f"{b.name}: gives_map is {b.gives_map}, but score gave "
                                   f"{len(res)} maps")
            out[b.name] = (res[0], res[1])
            if b.gives_map:   # a localisation map besides the scores (LOC)
                out[b.name + LOC] = (res[2], res[1])
            ms[b.stage] = ms.get(b.stage, 0.0) + (time.perf_counter() - t) * 1000.0 / n
        return out, ms

    def score(self, fm: FeatureMaps, area: np.ndarray, branch_maps: bool = True) -> Scored:
        """Image scores and maps of a batch; `area` (B, S, S): pixels inside each image.
        `branch_maps=False` skips the per-branch pixel maps (only the fused map is needed)."""
        if not self.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        raw, ms = self.branch_scores(fm)
        t = time.perf_counter()
        cfg = self.config
        maps = {n: normalise(s, v, *self.norm[n]) for n, (s, v) in raw.items()}
        scores, pix = self.fuse(maps, area)
        bpix = ({n: upsample(m, cfg.size, cfg.sigma) for n, m in localisation_maps(maps).items()}
                if branch_maps else {})
        ms["fusion"] = (time.perf_counter() - t) * 1000.0 / max(len(fm), 1)
        return Scored(scores, pix, bpix, ms)

    def fuse(self, maps: dict[str, torch.Tensor], area: np.ndarray,
             weights: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and fused pixel maps (B, S, S) from normalised (B, h, w) patch
        maps: the weighted sum (`weights`, default the fitted ones) upsampled and blurred,
        the padding floored, the score read over the image area; the map then leaves out
        `config.map_exclude` and takes each branch's localisation map where it has one."""
        cfg = self.config
        w = self.weights if weights is None else weights
        pix = _floored(self._pixels(maps, w), area)
        scores = image_scores(pix, area, cfg.score_mode, cfg.topk)
        map_w = map_weights(w, cfg.map_exclude)
        loc = localisation_maps(maps)
        if map_w is not None or len(loc) < len(maps):
            pix = _floored(self._pixels(loc, map_w or w), area)
        return scores, pix

    def export_module(self) -> CoreGraph:
        """`score` as a module of torch operations that exports to ONNX (`CoreGraph`);
        `ConfigError` names a branch that cannot be exported."""
        if not self.branches:
            raise RuntimeError("the detector has not been fitted or loaded")
        return CoreGraph(self)

    # ---------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for b in self.branches:
            out.update({f"{b.name}.{k}": v.contiguous() for k, v in b.state_dict().items()})
        return out

    def meta(self) -> dict[str, Any]:
        return {"modalities": self.modalities, "branches": list(self.names),
                "norm": {n: list(v) for n, v in self.norm.items()}, "weights": self.weights,
                "threshold": self.threshold, "decision": self.decision.to_dict(),
                "branch_meta": {b.name: b.meta() for b in self.branches}}

    @classmethod
    def from_state(cls, config: DetectorConfig, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> DetectorCore:
        """Inverse of `tensors()` / `meta()`; KeyError / ValueError / RuntimeError on a mismatch."""
        core = cls(config)
        core.modalities = [str(m) for m in meta["modalities"]]
        names = [str(n) for n in meta["branches"]]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown or not names:
            raise ValueError(f"unknown or no branches {unknown or names}")
        core.branches = [REGISTRY[n](config) for n in names]
        keys = [*names, *(b.name + LOC for b in core.branches if b.gives_map)]
        missing = [k for k in keys if k not in meta["norm"]]
        if missing:
            raise ValueError(f"no normalisation for {missing}")
        core.norm = {n: (float(meta["norm"][n][0]), float(meta["norm"][n][1])) for n in keys}
        core.weights = {n: float(meta["weights"][n]) for n in names}
        threshold = float(meta["threshold"])  # ValueError / TypeError on a bad value
        core.decision = (Decision.from_dict(meta["decision"]) if "decision" in meta
                         else Decision.legacy(threshold))
        if core.decision.threshold != threshold and not (
                math.isinf(threshold) and math.isinf(core.decision.threshold)):
            raise ValueError(f"threshold {threshold} differs from the decision's "
                             f"{core.decision.threshold}")
        for b in core.branches:
            own = {k[len(b.name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{b.name}.")}
            b.load_state_dict(own, meta["branch_meta"].get(b.name, {}))
        return core


# key suffix of a branch's localisation map, when its `score` gives one besides the scores
# (the mapping with `loss: nll`): normalised on its own, it replaces the branch's map in the
# fused pixel map; the image score keeps the branch's scores
LOC = "@map"


def localisation_maps(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The branch maps the pixel map fuses: each branch's localisation map where it has one."""
    return {n: maps.get(n + LOC, m) for n, m in maps.items() if not n.endswith(LOC)}


def map_weights(weights: dict[str, float], exclude: Sequence[str]) -> dict[str, float] | None:
    """The weights without the branches of `exclude`, rescaled to the same sum; None when
    that changes nothing (no weighted branch excluded) or leaves no weighted branch."""
    keep = {n: w for n, w in weights.items() if w and n not in exclude}
    if not keep or len(keep) == sum(1 for w in weights.values() if w):
        return None
    k = sum(weights.values()) / sum(keep.values())
    return {n: w * k for n, w in keep.items()}


def _floored(pix: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Maps with the padding outside each image set to the map's floor (its lowest value
    inside the image, at most 0)."""
    floor = np.array([min(0.0, float(m[a].min())) if a.any() else 0.0
                      for m, a in zip(pix, area)], dtype=np.float32)
    return np.where(area, pix, floor[:, None, None]).astype(np.float32)


class CoreGraph(torch.nn.Module):
    """`DetectorCore.score` (image scores and fused maps, no branch maps) for ONNX export.

    forward(fm, area) -> (scores (B,), maps (B, S, S)): each branch's own export module,
    the same normalisation and weighted sum, `PixelMaps` for the upsampling and blur, the
    padding set to each map's floor, and the image score over the image area.
    """

    def __init__(self, core: DetectorCore) -> None:
        super().__init__()
        cfg = core.config
        self.names = core.names
        self.branches = torch.nn.ModuleList([b.export_module() for b in core.branches])
        self.norm = {n: tuple(v) for n, v in core.norm.items()}
        self.weights = dict(core.weights)
        self.map_weights = core.map_weights
        self.pixels = PixelMaps(cfg.size, cfg.sigma)
        if cfg.score_mode not in ("max", "topk"):
            raise ConfigError(f"score_mode {cfg.score_mode!r} cannot be exported")
        self.score_mode = cfg.score_mode
        self.topk = int(cfg.topk)

    def forward(self, fm: FeatureMaps, area: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = {}
        for name, module in zip(self.names, self.branches):
            res = module(fm)
            maps[name] = normalise(res[0], res[1], *self.norm[name])
            if len(res) > 2:
                maps[name + LOC] = normalise(res[2], res[1], *self.norm[name + LOC])
        flat_area = area.flatten(1)
        has = flat_area.any(1)
        inside = flat_area | ~has[:, None]  # no image area: the whole map (as image_scores)

        def floored(pix: torch.Tensor) -> torch.Tensor:
            flat = pix.flatten(1)
            low = torch.where(inside, flat, torch.full_like(flat, float("inf"))).min(1).values
            floor = torch.where(has, torch.clamp(low, max=0.0), torch.zeros_like(low))
            return torch.where(area, pix, floor[:, None, None])

        pix = floored(self.pixels(combine(maps, self.weights)))
        flat = torch.where(inside, pix.flatten(1), torch.full_like(pix.flatten(1), float("-inf")))
        if self.score_mode == "max":
            scores = flat.max(1).values
        else:
            k = min(self.topk, flat.shape[1])
            scores = torch.topk(flat, k, dim=1).values.mean(1)
        loc = localisation_maps(maps)
        if self.map_weights is not None or len(loc) < len(maps):
            pix = floored(self.pixels(combine(loc, self.map_weights or self.weights)))
        return scores, pix
