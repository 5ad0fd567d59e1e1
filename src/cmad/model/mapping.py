"""A dense bidirectional mapping between two per-patch feature sets (the CFM idea).

On normal parts, a patch's appearance features (A, e.g. RGB CNN features) and its shape
features (B, e.g. CNN features of the rendered geometry) predict each other. Two small
MLPs, A -> B and B -> A, are trained on paired normal patches; a test patch is scored by
how badly each modality is predicted from the other. A defect that changes one modality
only (a stain, a dent the colour hides) breaks the pair.

`CrossModalMapping(MappingConfig()).fit(a, b, val_a, val_b)` trains; `score(a, b)` gives
one score per patch (higher = more anomalous); `state_dict()` / `load_state_dict()` hold
tensors only (for safetensors), and `round_to_float16()` makes a float16 copy score exactly
as the model in memory.

Training is deterministic: weights start from a seeded generator, every epoch draws its
patches with a seeded generator, and early stopping watches the loss on validation
normals only. Each feature dimension is standardised with training statistics; the
squared errors of each direction are divided by their per-dimension residual variance on
the training patches, so that every output dimension counts by how predictable it is on
normal data.

With `loss: nll` each MLP also predicts, per patch, the log variance of its own error (a
Gaussian negative log-likelihood: error / variance + log variance): where normal parts
are hard to predict (creases, crater rims, texture), the predicted variance is large.
`score_pair` then gives two maps: for detection, each direction's error divided by its
predicted variance (a normal patch that is merely hard to predict stays low); for
localisation, the plain error, as with `mse` (`score_pair`). The variance is learnt on the
unweighted squared errors (training), while scoring divides the residual-weighted error by
it: the weights rescale the dimensions, the variance says where on the part errors are
large.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from cmad.errors import ConfigError
from cmad.progress import progress as progress_bar

log = logging.getLogger(__name__)

LOSSES = ("mse", "cosine", "nll")
# the predicted log variance (nll) is kept within this range: exp(6) ~ 400
_LOGVAR = 6.0
COMBINES = ("sum", "product")


@dataclass(frozen=True)
class MappingConfig:
    """Settings of the mapping.

    hidden: width of the MLPs' hidden layers (two hidden layers each). 64 was chosen on
        the tuning seeds 0 and 1 against 128 and 256 (RESULTS.md, round 5): the same
        accuracy within 0.003, a sixth of 256's bytes (94 vs 574 KB) and under half its
        scoring time.
    epochs: the most passes; one pass draws `patches_per_epoch` training patches.
    patches_per_epoch: patches drawn (without replacement, seeded) for each epoch, so that
        training time does not grow with the training set (all when there are fewer).
    patience: epochs without a lower validation loss before training stops.
    loss: "nll" (mse with a per-patch predicted variance; the detection score is the
        error over it, the localisation score the plain error), "mse" (on standardised
        features) or "cosine" (1 - cosine similarity). "nll" replaced "mse" in round 9,
        chosen on the tuning seeds 0 and 1: cmad's mean I-AUROC 0.8934 -> 0.9070 and
        AUPRO@30% 0.9276 -> 0.9264 at working resolution (the mapping alone detects worse,
        0.8893 -> 0.8633: its scores complement the banks' better; RESULTS.md, round 9).
    combine: how the two directions' errors make the patch score: "sum" or "product".
    seed: weights and patch draws.
    """

    hidden: int = 64
    epochs: int = 40
    batch_size: int = 256
    patches_per_epoch: int = 16384
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 5
    loss: str = "nll"
    combine: str = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size", "patches_per_epoch", "patience"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"mapping {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"mapping lr must be > 0 and weight_decay >= 0, got "
                              f"{self.lr}, {self.weight_decay}")
        if self.loss not in LOSSES:
            raise ConfigError(f"mapping loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"mapping combine must be one of {list(COMBINES)}, "
                              f"got {self.combine!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MappingConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown mapping option(s): {sorted(unknown)}")
        return cls(**d)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: with more, the reductions of the weight gradients are split
    differently and the trained weights change in the last bits with the thread count
    (and on shared CPUs the OpenMP workers slow small batches down several times)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.GELU(),
        nn.Linear(d_hidden, d_hidden), nn.GELU(),
        nn.Linear(d_hidden, d_out),
    )


class MappingNet(nn.Module):
    """The two MLPs: `a_to_b` and `b_to_a`; with `logvar`, each has one more output, the
    log variance of its error on the patch."""

    def __init__(self, d_a: int, d_b: int, hidden: int, logvar: bool = False) -> None:
        super().__init__()
        extra = int(logvar)
        self.a_to_b = _mlp(d_a, hidden, d_b + extra)
        self.b_to_a = _mlp(d_b, hidden, d_a + extra)


def _split(out: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An MLP's output as (prediction (M, dim), log variance (M,) or None)."""
    if out.shape[1] == dim:
        return out, None
    return out[:, :dim], out[:, dim].clamp(-_LOGVAR, _LOGVAR)


def _errors(out: torch.Tensor, target: torch.Tensor, kind: str,
            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M,) error of each row (mean (weighted) squared error, or 1 - cosine similarity) and
    the (M,) log variance the MLP predicted for it (None without one)."""
    pred, logvar = _split(out, target.shape[1])
    if kind == "cosine":
        return 1.0 - nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-6), logvar
    r = (pred - target).pow(2)
    if weight is not None:
        r = r * weight
    return r.mean(1), logvar


class CrossModalMapping:
    """Fit on paired normal patches (A, B), score test patch pairs."""

    def __init__(self, cfg: MappingConfig | None = None) -> None:
        self.cfg = MappingConfig() if cfg is None else cfg
        self.net: MappingNet | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.history: list[tuple[float, float]] = []
        self.best_epoch = 0

    # ------------------------------------------------------------------ helpers
    def _standardise(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stats
        return (a.float() - s["a_mean"]) / s["a_std"], (b.float() - s["b_mean"]) / s["b_std"]

    def _pair_errors(self, net: MappingNet, a: torch.Tensor, b: torch.Tensor, weighted: bool
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor | None],
                                tuple[torch.Tensor, torch.Tensor | None]]:
        """(error, log variance) of the A -> B and B -> A predictions of standardised
        inputs, each (M,) (the log variance None without `loss: nll`)."""
        kind = "mse" if self.cfg.loss == "nll" else self.cfg.loss
        w_b = self.stats.get("w_b") if weighted else None
        w_a = self.stats.get("w_a") if weighted else None
        return (_errors(net.a_to_b(a), b, kind, w_b), _errors(net.b_to_a(b), a, kind, w_a))

    def _loss(self, net: MappingNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for e, logvar in self._pair_errors(net, a, b, weighted=False):
            # Gaussian negative log-likelihood up to constants, per patch (min at e = var)
            total = total + (e.mean() if logvar is None else (e * torch.exp(-logvar) + logvar).mean())
        return total

    @staticmethod
    def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
            raise ValueError(f"{what}: need paired (M, D) features, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")

    # ------------------------------------------------------------------ training
    def fit(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        val_a: torch.Tensor | None = None,
        val_b: torch.Tensor | None = None,
        progress: bool = False,
    ) -> CrossModalMapping:
        """Train both directions with Adam on (M, D_a) and (M, D_b) normal training patches.

        Early stopping watches the loss on the validation patches (when given; the
        training loss otherwise) and keeps the best epoch's weights. Runs on one thread,
        so the model is the same whatever torch's thread count.
        """
        with _one_thread():
            return self._fit(a, b, val_a, val_b, progress)

    def _fit(self, a: torch.Tensor, b: torch.Tensor, val_a: torch.Tensor | None,
             val_b: torch.Tensor | None, progress: bool) -> CrossModalMapping:
        cfg = self.cfg
        self._check_pair(a, b, "training patches")
        if a.shape[0] < 2:
            raise ValueError(f"need at least 2 training patches, got {a.shape[0]}")
        has_val = val_a is not None and val_b is not None and val_a.shape[0] > 0
        if has_val:
            self._check_pair(val_a, val_b, "validation patches")
            if val_a.shape[1] != a.shape[1] or val_b.shape[1] != b.shape[1]:
                raise ValueError("validation features have other widths than the training ones")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("training features contain NaN or inf")
        self.stats = {
            "a_mean": a.mean(0), "a_std": a.std(0).clamp_min(1e-6),
            "b_mean": b.mean(0), "b_std": b.std(0).clamp_min(1e-6),
        }
        za, zb = self._standardise(a, b)
        if has_val:
            va, vb = self._standardise(val_a, val_b)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = MappingNet(za.shape[1], zb.shape[1], cfg.hidden, cfg.loss == "nll")
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_loss, best_state, bad = float("inf"), None, 0
        self.history = []
        n = za.shape[0]
        per_epoch = min(cfg.patches_per_epoch, n)
        bar = progress_bar(range(cfg.epochs), desc="mapping", unit="epoch", enabled=progress)
        for epoch in bar:
            net.train()
            idx_all = torch.randperm(n, generator=gen)[:per_epoch]
            total = 0.0
            for s in range(0, per_epoch, cfg.batch_size):
                idx = idx_all[s : s + cfg.batch_size]
                loss = self._loss(net, za[idx], zb[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            train_loss = total / per_epoch
            net.eval()
            with torch.inference_mode():
                val_loss = float(self._loss(net, va, vb)) if has_val else train_loss
            self.history.append((train_loss, val_loss))
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            # an improvement by more than 1e-4 of the best loss's size (the nll loss can be
            # negative; for losses >= 0 this is val_loss < best_loss * (1 - 1e-4))
            if math.isfinite(val_loss) and (best_state is None
                                            or val_loss < best_loss - 1e-4 * abs(best_loss)):
                best_loss, bad, self.best_epoch = val_loss, 0, epoch + 1
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    log.debug("mapping: early stop at epoch %d (best %d)", epoch + 1,
                              self.best_epoch)
                    break
        bar.close()
        if best_state is None:
            raise ValueError("mapping training diverged: the loss is not finite (lower lr)")
        log.debug("mapping: %d epochs, best %d (validation loss %.4f)", len(self.history),
                  self.best_epoch, best_loss)
        net.load_state_dict(best_state)
        net.eval()
        self.net = net
        self._residual_weights(za, zb)
        return self

    @torch.inference_mode()
    def _residual_weights(self, za: torch.Tensor, zb: torch.Tensor, chunk: int = 8192) -> None:
        """1 / per-dimension residual variance of each direction on the training patches."""
        if self.net is None:
            raise RuntimeError("mapping: not fitted")
        sq_b = torch.zeros(zb.shape[1])
        sq_a = torch.zeros(za.shape[1])
        for s in range(0, za.shape[0], chunk):
            a, b = za[s : s + chunk], zb[s : s + chunk]
            sq_b += (_split(self.net.a_to_b(a), zb.shape[1])[0] - b).pow(2).sum(0)
            sq_a += (_split(self.net.b_to_a(b), za.shape[1])[0] - a).pow(2).sum(0)
        n = za.shape[0]
        self.stats["w_b"] = 1.0 / (sq_b / n).clamp_min(1e-3)
        self.stats["w_a"] = 1.0 / (sq_a / n).clamp_min(1e-3)

    # ------------------------------------------------------------------ scoring
    def combine(self, pair: tuple[tuple[torch.Tensor, torch.Tensor | None],
                                  tuple[torch.Tensor, torch.Tensor | None]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(detection, localisation) (M,) scores from `_pair_errors`: the two directions
        summed (or multiplied); for detection each error over its predicted variance."""
        def join(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x * y if self.cfg.combine == "product" else x + y

        (e_ab, v_ab), (e_ba, v_ba) = pair
        plain = join(e_ab, e_ba)
        if v_ab is None or v_ba is None:
            return plain, plain
        return join(e_ab * torch.exp(-v_ab), e_ba * torch.exp(-v_ba)), plain

    @torch.inference_mode()
    def score_pair(self, a: torch.Tensor, b: torch.Tensor, chunk: int = 16384
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) detection and localisation scores of paired patches, higher = more
        anomalous (the same tensor twice unless `loss: nll`)."""
        if self.net is None:
            raise RuntimeError("CrossModalMapping used before fit or load_state_dict")
        self._check_pair(a, b, "patches to score")
        det, loc = [], []
        for s in range(0, a.shape[0], chunk):
            za, zb = self._standardise(a[s : s + chunk], b[s : s + chunk])
            d, m = self.combine(self._pair_errors(self.net, za, zb, weighted=True))
            det.append(d)
            loc.append(m)
        if not det:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(det), torch.cat(loc)

    @torch.inference_mode()
    def directions(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) plain errors of predicting B from A and A from B (residual-weighted for mse
        and nll)."""
        if self.net is None:
            raise RuntimeError("CrossModalMapping used before fit or load_state_dict")
        self._check_pair(a, b, "patches to score")
        za, zb = self._standardise(a, b)
        (e_ab, _), (e_ba, _) = self._pair_errors(self.net, za, zb, weighted=True)
        return e_ab, e_ba

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(M,) detection scores of paired patches, higher = more anomalous."""
        return self.score_pair(a, b)[0]

    # ------------------------------------------------------------------ storage
    def round_to_float16(self) -> None:
        """Round every stored tensor to float16 precision (kept float32 for compute), so a
        copy saved in float16 scores exactly as this one."""
        if self.net is None:
            raise RuntimeError("nothing to round: fit or load first")
        with torch.no_grad():
            for t in self.net.state_dict().values():
                t.copy_(t.half().float())
        self.stats = {k: v.half().float() for k, v in self.stats.items()}

    def state_dict(self, half: bool = False) -> dict[str, torch.Tensor]:
        """Tensors only; `half` stores float16 (call `round_to_float16` first to score the
        same after loading)."""
        if self.net is None:
            raise RuntimeError("nothing to save: fit or load first")
        sd = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        sd.update({k: v.clone().contiguous() for k, v in self.stats.items()})
        return {k: v.half() if half else v.float() for k, v in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict()` output (float16 or float32)."""
        need = {"a_mean", "a_std", "b_mean", "b_std", "w_a", "w_b", "net.a_to_b.0.weight"}
        missing = need - set(sd)
        if missing:
            raise ValueError(f"mapping state lacks {sorted(missing)}")
        sd = {k: v.float() for k, v in sd.items()}
        hidden = int(sd["net.a_to_b.0.weight"].shape[0])
        if hidden != self.cfg.hidden:
            raise ValueError(f"mapping state has hidden width {hidden}, config {self.cfg.hidden}")
        d_a, d_b = int(sd["a_mean"].shape[0]), int(sd["b_mean"].shape[0])
        outs = int(sd["net.a_to_b.4.weight"].shape[0]) if "net.a_to_b.4.weight" in sd else d_b
        if outs != d_b + int(self.cfg.loss == "nll"):
            raise ValueError(f"mapping state has {outs - d_b} variance outputs, config loss "
                             f"{self.cfg.loss!r}")
        net = MappingNet(d_a, d_b, hidden, self.cfg.loss == "nll")
        net.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
        net.eval()
        self.net = net
        self.stats = {k: v for k, v in sd.items() if not k.startswith("net.")}
