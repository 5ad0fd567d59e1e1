"""How the training-feature stream shares the CPUs: two ways, alternating, on one category.

    python scripts/stream_features.py --data DATA --category C [--samples 64] [--runs 5]

- `serial`: read, preprocess and extract each batch one after another on all torch threads;
- `stream`: `Detector.sample_features` as `cmad fit` runs it (batches read, preprocessed
  and extracted side by side on worker threads, `cmad.stages`).
Prints one JSON object: ms per sample of each run, per way, and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from cmad.data import open_dataset
    from cmad.pipeline import Detector
    from cmad.runtime import set_threads

    set_threads(args.threads)
    cat = open_dataset(args.data).category(args.category)
    refs = cat.refs("train")[: args.samples + 8]
    det = Detector()
    det.extractor_for([m for m in ("rgb", "xyz") if getattr(cat.load(refs[0]), m) is not None])
    det.sample_features([cat.load(r) for r in refs[-8:]])  # warm-up (numba, CNN)
    work, bs = refs[: args.samples], det.config.batch_size

    def serial() -> None:
        for i in range(0, len(work), bs):
            det.extractor.extract(det.prepare([cat.load(r) for r in work[i : i + bs]]))

    def stream() -> None:
        det.sample_features(work, load=cat.load)

    ways = {"serial": serial, "stream": stream}
    ms: dict[str, list[float]] = {k: [] for k in ways}
    load0 = os.getloadavg()
    for run in range(args.runs):
        order = list(ways)
        random.Random(run).shuffle(order)
        for k in order:
            t = time.perf_counter()
            ways[k]()
            ms[k].append(round((time.perf_counter() - t) * 1000.0 / len(work), 1))
    print(json.dumps({"ms_per_sample": {k: sorted(v) for k, v in ms.items()},
                      "samples": len(work), "threads": args.threads,
                      "load_average": [load0[0], os.getloadavg()[0]]}))


if __name__ == "__main__":
    main()
