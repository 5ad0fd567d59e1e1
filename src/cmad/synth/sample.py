"""One sample of the plan: its random generators, its defect kinds, and rendering it with
defects that are large enough to see (retried a few times)."""
from __future__ import annotations

import zlib

import numpy as np

from cmad.errors import ConfigError
from cmad.synth.catalog import CLASS_IDS, COMBINED, DEFECT_TYPES, CategorySpec, get_category
from cmad.synth.defects import Defect, place_defects
from cmad.synth.presets import get_preset
from cmad.synth.render import Rendered, render_scene
from cmad.synth.scene import build_scene

_SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}


def _rngs(seed: int, category: str, split: str, folder: str, index: int
          ) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent scene, defect and noise generators of one sample."""
    ss = np.random.SeedSequence([seed, zlib.crc32(category.encode()), _SPLIT_CODES[split],
                                 zlib.crc32(folder.encode()), index])
    a, b, c = ss.spawn(3)
    return np.random.default_rng(a), np.random.default_rng(b), np.random.default_rng(c)


def _folder_kinds(folder: str, rng: np.random.Generator) -> list[str]:
    """The defect kinds of a sample in `folder` (2-3 distinct kinds for `combined`)."""
    if folder == "good":
        return []
    if folder == COMBINED:
        n = int(rng.integers(2, 4))
        return list(rng.choice(DEFECT_TYPES, size=n, replace=False))
    return [folder]


def make_sample(cat: CategorySpec, scale: float, seed: int, split: str, folder: str, index: int,
                with_defects: bool = True) -> Rendered:
    """Render sample `index` of `split`/`folder` of `cat`. Defects are placed again (up to 8
    tries) until each covers enough pixels and all together at most 3.5% of the image, else
    the try whose smallest defect is largest is kept. `with_defects=False` renders the same
    scene and noise without them."""
    r_scene, r_def, r_noise = _rngs(seed, cat.name, split, folder, index)
    scene = build_scene(cat, scale, r_scene)
    kinds = _folder_kinds(folder, r_def)
    min_px = max(3, int(0.0008 * scene.width * scene.height))
    best: tuple[int, list[Defect], Rendered] | None = None
    for _ in range(8):
        defects = place_defects(scene, kinds, r_def)
        out = render_scene(scene, defects, np.random.default_rng(r_noise.bit_generator.seed_seq))
        if not kinds:
            return out
        counts = [int((out.gt == CLASS_IDS[d.kind]).sum()) for d in defects]
        worst = min(counts) if len(defects) == len(kinds) else 0
        if best is None or worst > best[0]:
            best = (worst, defects, out)
        if worst >= min_px and (out.gt > 0).mean() <= 0.035:
            break
    if best is None or best[0] == 0:
        raise RuntimeError(f"could not place {kinds} on {cat.name} {split}/{folder}/{index}")
    if not with_defects:
        return render_scene(scene, [], np.random.default_rng(r_noise.bit_generator.seed_seq))
    return best[2]


def render_sample(category: str, defect: str | None = None, seed: int = 0,
                  size: str = "tiny", index: int = 0, with_defect: bool = True) -> Rendered:
    """Render one test sample of `category` with `defect` (a DEFECT_TYPES name, "combined" or
    None for a good one). With `with_defect=False` the same scene, pose, lighting and noise
    are rendered without the defect, so the two differ only by what the defect changes."""
    cat = get_category(category)
    folder = defect if defect is not None else "good"
    if folder not in DEFECT_TYPES + [COMBINED, "good"]:
        raise ConfigError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    return make_sample(cat, get_preset(size)["scale"], seed, "test", folder, index, with_defect)
