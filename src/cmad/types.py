"""Typed records shared by every stage: files -> Sample -> Prepared -> features -> Prediction."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SamplePaths:
    """The files one sample was read from (None where the modality is absent).

    extra: other files its arrays were computed from (an Eyecandies depth range); reader:
    the reader's settings that change them (an Eyecandies depth scale). Both are part of
    the cache keys of everything computed from the sample."""

    rgb: Path | None
    xyz: Path | None
    gt: Path | None
    extra: tuple[Path, ...] = ()
    reader: str = ""


@dataclass(frozen=True)
class Sample:
    """One sample at its original resolution, as read from disk.

    rgb: uint8 (H, W, 3) or None for 3D-only data.
    xyz: float32 (H, W, 3) organized point cloud in metres, or None for RGB-only data;
        invalid points (NaN, inf or all-zero on disk) are set to exactly 0.
    valid: bool (H, W), True where xyz holds a real point (all True for RGB-only data).
    gt: bool (H, W) defect mask (gt > 0); all False for normal samples.
    gt_values: uint8 (H, W) raw gt values (defect-type ids from class_ids.json), or None.
    label: 0 normal, 1 anomalous.
    """

    rgb: np.ndarray | None
    xyz: np.ndarray | None
    valid: np.ndarray
    gt: np.ndarray
    label: int
    defect_type: str
    stem: str
    category: str
    split: str
    paths: SamplePaths
    gt_values: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return (int(self.valid.shape[0]), int(self.valid.shape[1]))

    @property
    def key(self) -> str:
        """A stable identifier: category/split/defect_type/stem."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"


@dataclass(frozen=True)
class Geometry:
    """How a working-resolution square maps back to the original image.

    The original (H, W) image was zero-padded to a square of side max(H, W) with
    `pad_top` rows above and `pad_left` columns to the left, then resized to `size`.
    """

    orig_h: int
    orig_w: int
    pad_top: int
    pad_left: int
    size: int

    @property
    def side(self) -> int:
        return max(self.orig_h, self.orig_w)

    def image_mask(self, h: int, w: int) -> np.ndarray:
        """bool (h, w): cells of an h x w grid over the working square whose centre lies
        inside the original image (not in the padding). h = w = size gives pixels."""
        ys = (np.arange(h) + 0.5) * self.side / h
        xs = (np.arange(w) + 0.5) * self.side / w
        iny = (ys >= self.pad_top) & (ys < self.pad_top + self.orig_h)
        inx = (xs >= self.pad_left) & (xs < self.pad_left + self.orig_w)
        return iny[:, None] & inx[None, :]


@dataclass(frozen=True)
class Prepared:
    """A preprocessed sample at the square working resolution S.

    rgb: uint8 (S, S, 3) or None; xyz: float32 (S, S, 3) or None, zero where not foreground;
    valid: bool (S, S) real points; foreground: bool (S, S) valid points off the background
    plane (all True inside the image for RGB-only data, False in the padding);
    gt: bool (S, S); gt_orig: bool (H, W) at original resolution, for metrics and export.
    """

    rgb: np.ndarray | None
    xyz: np.ndarray | None
    valid: np.ndarray
    foreground: np.ndarray
    gt: np.ndarray
    gt_orig: np.ndarray
    geometry: Geometry
    label: int
    defect_type: str
    stem: str
    category: str
    split: str
    paths: SamplePaths

    @property
    def key(self) -> str:
        return f"{self.category}/{self.split}/{self.defect_type}/{self.stem}"


@dataclass(frozen=True)
class Prediction:
    """The result for one sample.

    score: image-level anomaly score (higher = more anomalous).
    anomaly_map: float32 (H, W) at the original image size.
    anomaly_map_work: float32 (S, S) at working resolution.
    branch_maps: per-branch standardised maps at working resolution, e.g. "mapping",
        "rgb_bank", "xyz_bank" (a branch's localisation map where it has one: for the
        mapping with `loss: nll`, its plain errors, not the scores over their variance).
    """

    score: float
    anomaly_map: np.ndarray
    anomaly_map_work: np.ndarray
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    key: str = ""
    label: int | None = None
    defect_type: str | None = None
