"""Predict throughput of a saved model on an input folder, in-process, no output files.

    python scripts/throughput.py --model MODEL --input FOLDER [--threads 2] [--runtime torch|onnx]

FOLDER holds rgb/*.png and xyz/*.tiff as `cmad predict --input` reads them. After a
warm-up on the first batch, every sample goes through `iter_predict` (read and preprocessed
a batch ahead in a worker thread; scores and maps at the original size), timed as a whole.
Then the first 40 samples are timed stage by stage (`predict_timed`; those times overlap
the worker's reading and preprocessing, so they add up to more than the wall clock).
Prints one JSON object with samples/s, ms per sample, the stages and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnx"))
    args = ap.parse_args()

    from cmad.export import load_predictor
    from cmad.predict_io import input_files, read_sample
    from cmad.runtime import set_threads

    set_threads(args.threads)
    det = load_predictor(args.model, args.runtime)
    files = input_files(None, None, args.input, det.modalities)

    def load(f):  # noqa: ANN001, ANN202 - (rgb, xyz, stem)
        return read_sample(*f)

    list(det.iter_predict(files[:8], load=load))  # warm-up: compilation, allocator
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    n = sum(1 for _ in det.iter_predict(files, load=load))
    wall = time.perf_counter() - t0
    samples = [load(f) for f in files[:40]]
    _, ms = (det.predict_timed(samples) if args.runtime == "onnx"
             else det.predict_timed(samples, branch_maps=False))
    print(json.dumps({
        "model": str(args.model), "input": str(args.input), "runtime": args.runtime,
        "threads": args.threads, "n": n, "samples_per_s": round(n / wall, 2),
        "ms_per_sample": round(1000.0 * wall / n, 1),
        "stages_ms": {k: round(v, 1) for k, v in ms.items()},
        "load_average": [load0, os.getloadavg()[0]],
    }, indent=1))


if __name__ == "__main__":
    main()
