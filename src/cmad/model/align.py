"""Cross-modal semantic alignment: the inter-modal branch.

On normal parts, what a patch looks like follows from its shape and its place on the part.
The branch learns that relation on normal training patches and scores a test patch by how
far each modality is from what the other one predicts.

Two variants:
- "mapping": two small MLPs, geometry -> appearance and appearance -> geometry (the CFM idea);
  the score is the squared error of both predictions in standardised feature units.
- "latent": two projection heads into a shared latent space aligned by a cosine loss, with a
  variance term that prevents collapse (VICReg style); the score is 1 - cosine similarity.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cmad.errors import ConfigError
from cmad.progress import progress as progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignConfig:
    """Settings of the alignment branch."""

    variant: str = "mapping"
    hidden: int = 256
    latent: int = 64
    epochs: int = 40
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 5
    max_train_patches: int = 200000
    residual_norm: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "latent", "epochs", "batch_size", "patience", "max_train_patches"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                              f"{self.weight_decay}")
        if self.variant not in ("mapping", "latent"):
            raise ConfigError(f"variant must be 'mapping' or 'latent', got {self.variant!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden),
        nn.GELU(),
        nn.Linear(d_hidden, d_hidden),
        nn.GELU(),
        nn.Linear(d_hidden, d_out),
    )


class AlignNet(nn.Module):
    """The trainable part: pure torch, no orchestration."""

    def __init__(self, d_app: int, d_geo: int, cfg: AlignConfig) -> None:
        super().__init__()
        self.variant = cfg.variant
        if cfg.variant == "mapping":
            self.geo_to_app = _mlp(d_geo, cfg.hidden, d_app)
            self.app_to_geo = _mlp(d_app, cfg.hidden, d_geo)
        elif cfg.variant == "latent":
            self.app_head = _mlp(d_app, cfg.hidden, cfg.latent)
            self.geo_head = _mlp(d_geo, cfg.hidden, cfg.latent)
        else:
            raise ValueError(f"unknown alignment variant {cfg.variant!r} (mapping or latent)")

    def loss_terms(self, app: torch.Tensor, geo: torch.Tensor,
                   w_app: torch.Tensor | None = None, w_geo: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Per-sample score (M,); lower is more consistent. w_*: per-dimension weights of the
        squared errors (1 / residual variance on normal data), None for plain MSE."""
        if self.variant == "mapping":
            r_app = (self.geo_to_app(geo) - app).pow(2)
            r_geo = (self.app_to_geo(app) - geo).pow(2)
            if w_app is not None and w_geo is not None:
                r_app, r_geo = r_app * w_app, r_geo * w_geo
            return r_app.mean(1) + r_geo.mean(1)
        za = nn.functional.normalize(self.app_head(app), dim=1)
        zg = nn.functional.normalize(self.geo_head(geo), dim=1)
        return 1.0 - (za * zg).sum(1)

    def loss(self, app: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        terms = self.loss_terms(app, geo).mean()
        if self.variant == "latent":
            za = self.app_head(app)
            zg = self.geo_head(geo)
            std = torch.sqrt(torch.cat([za, zg], 1).var(0) + 1e-4)
            terms = terms + torch.relu(1.0 - std).mean()
        return terms


class CrossModalAlignment:
    """Fit on paired normal patches (appearance, geometry), score test patches."""

    def __init__(self, cfg: AlignConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        self.net: AlignNet | None = None
        self.app_mean = self.app_std = self.geo_mean = self.geo_std = None
        self.history: list[tuple[float, float]] = []
        self.w_app: torch.Tensor | None = None
        self.w_geo: torch.Tensor | None = None

    def _standardise(self, app: torch.Tensor, geo: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (app - self.app_mean) / self.app_std, (geo - self.geo_mean) / self.geo_std

    def fit(
        self,
        app: torch.Tensor,
        geo: torch.Tensor,
        val_app: torch.Tensor | None = None,
        val_geo: torch.Tensor | None = None,
        progress: bool = False,
    ) -> CrossModalAlignment:
        """Train with Adam; early stopping on the validation loss when validation is given."""
        if app.shape[0] != geo.shape[0] or app.shape[0] == 0:
            raise ValueError(f"need paired, non-empty patches; got {app.shape[0]} and {geo.shape[0]}")
        gen = torch.Generator().manual_seed(self.seed)
        if app.shape[0] > self.cfg.max_train_patches:
            keep = torch.randperm(app.shape[0], generator=gen)[: self.cfg.max_train_patches]
            app, geo = app[keep], geo[keep]
        self.app_mean, self.app_std = app.mean(0), app.std(0).clamp_min(1e-6)
        self.geo_mean, self.geo_std = geo.mean(0), geo.std(0).clamp_min(1e-6)
        a, g = self._standardise(app.float(), geo.float())
        has_val = val_app is not None and val_geo is not None and val_app.shape[0] > 0
        if has_val:
            va, vg = self._standardise(val_app.float(), val_geo.float())
        torch.manual_seed(self.seed)
        net = AlignNet(a.shape[1], g.shape[1], self.cfg)
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        best = (float("inf"), None)
        bad = 0
        epochs = range(self.cfg.epochs)
        bar = progress_bar(epochs, desc="align", unit="epoch", enabled=progress)
        for epoch in bar:
            net.train()
            perm = torch.randperm(a.shape[0], generator=gen)
            total = 0.0
            for s in range(0, a.shape[0], self.cfg.batch_size):
                idx = perm[s : s + self.cfg.batch_size]
                loss = net.loss(a[idx], g[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            train_loss = total / a.shape[0]
            net.eval()
            with torch.inference_mode():
                val_loss = float(net.loss(va, vg)) if has_val else train_loss
            self.history.append((train_loss, val_loss))
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if val_loss < best[0] - 1e-4:
                best = (val_loss, {k: v.clone() for k, v in net.state_dict().items()})
                bad = 0
            else:
                bad += 1
                if bad >= self.cfg.patience:
                    log.debug("alignment: early stop at epoch %d", epoch + 1)
                    break
        bar.close()
        if best[1] is not None:
            net.load_state_dict(best[1])
        net.eval()
        self.net = net
        if self.cfg.residual_norm and self.cfg.variant == "mapping":
            ra, rg = (va, vg) if has_val else (a, g)
            with torch.inference_mode():
                self.w_app = 1.0 / (net.geo_to_app(rg) - ra).pow(2).mean(0).clamp_min(1e-3)
                self.w_geo = 1.0 / (net.app_to_geo(ra) - rg).pow(2).mean(0).clamp_min(1e-3)
        return self

    def round_to_float16(self) -> None:
        """Round every stored tensor to float16 precision (kept as float32 for compute), so
        the model saved in float16 scores exactly as the one in memory."""
        if self.net is None:
            raise RuntimeError("CrossModalAlignment.round_to_float16 called before fit")
        with torch.no_grad():
            for t in self.net.state_dict().values():
                t.copy_(t.half().float())
        for name in ("app_mean", "app_std", "geo_mean", "geo_std", "w_app", "w_geo"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.half().float())

    @torch.inference_mode()
    def score(self, app: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        """Inconsistency of each (M, .) patch pair; higher is more anomalous."""
        if self.net is None:
            raise RuntimeError("CrossModalAlignment.score called before fit")
        a, g = self._standardise(app.float(), geo.float())
        return self.net.loss_terms(a, g, self.w_app, self.w_geo)

    def state_dict(self, half: bool = False) -> dict[str, torch.Tensor]:
        """Tensors to save; `half` stores them as float16 (after `round_to_float16`)."""
        if self.net is None:
            raise RuntimeError("CrossModalAlignment.state_dict called before fit")
        sd = {f"net.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        sd.update(
            app_mean=self.app_mean, app_std=self.app_std, geo_mean=self.geo_mean, geo_std=self.geo_std
        )
        if self.w_app is not None and self.w_geo is not None:
            sd.update(w_app=self.w_app, w_geo=self.w_geo)
        return {k: v.half() if half else v for k, v in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        sd = {k: v.float() for k, v in sd.items()}
        self.app_mean, self.app_std = sd["app_mean"], sd["app_std"]
        self.geo_mean, self.geo_std = sd["geo_mean"], sd["geo_std"]
        self.w_app, self.w_geo = sd.get("w_app"), sd.get("w_geo")
        net = AlignNet(self.app_mean.shape[0], self.geo_mean.shape[0], self.cfg)
        net.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
        net.eval()
        self.net = net
