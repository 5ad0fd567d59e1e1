"""Same seed and data give the byte-identical model, and the same scores, whatever the
thread count: the tiny model fitted with 1 and with 2 threads in two fresh processes (with 2,
the memory banks are fitted in a worker thread beside the mapping; with 1, in turn; each
with its own empty cache, so no features are shared between them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixture_models import FAST_CONFIG

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = """
import json, sys, yaml
from pathlib import Path
from cmad.runtime import set_threads
from cmad.data import open_dataset
from cmad.model.config import DetectorConfig
from cmad.pipeline import Detector

root, cat, out, threads, cfg = sys.argv[1:]
set_threads(int(threads))
c = open_dataset(root).category(cat)
det = Detector(DetectorConfig.from_dict(yaml.safe_load(cfg)), cache_dir=Path(out) / "cache")
det.fit(c, progress=False).save(Path(out) / "model")
det = Detector.load(Path(out) / "model")
scores = [p.score for p in det.predict(c.samples("test"))]
(Path(out) / "scores.json").write_text(json.dumps(scores))
"""


def test_model_and_scores_do_not_depend_on_threads(tiny_root, tmp_path):
    cat = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())[0]
    procs = {}
    for n in (1, 2):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), NUMBA_NUM_THREADS=str(n))
        env.pop("MKL_CBWR", None)  # cmad sets it itself
        procs[n] = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tiny_root), cat, str(tmp_path / f"t{n}"), str(n),
             FAST_CONFIG], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for p in procs.values():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out.decode()
    m1, m2 = tmp_path / "t1" / "model", tmp_path / "t2" / "model"
    files1 = {p.name: p.read_bytes() for p in m1.iterdir()}
    files2 = {p.name: p.read_bytes() for p in m2.iterdir()}
    assert sorted(files1) == sorted(files2)
    for name in files1:
        assert files1[name] == files2[name], f"{name} differs between 1 and 2 threads"
    s1 = json.loads((tmp_path / "t1" / "scores.json").read_text())
    s2 = json.loads((tmp_path / "t2" / "scores.json").read_text())
    assert len(s1) > 0 and s1 == s2
