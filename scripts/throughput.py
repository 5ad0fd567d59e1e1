"""Predict throughput of a saved model on an input folder, in-process, no output files.

    python scripts/throughput.py --model MODEL --input FOLDER [--threads 2] [--runtime torch|onnx]

FOLDER holds rgb/*.png and xyz/*.tiff as `cmad predict --input` reads them. After a
warm-up on the first batch, every sample goes through `iter_predict` (batches read, preprocessed
and scored side by side on worker threads; scores and maps at the original size), timed as
a whole. Then the first 40 samples are timed stage by stage (`predict_timed`; those times
are measured in threads that share the cores, so they add up to more than the wall clock).
With `--alone`, each stage is also timed by itself on one thread, on the first 8 samples
(best of 3): the work one sample costs a core, which bounds what any scheduling can reach.
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
    ap.add_argument("--alone", action="store_true", help="also time each stage alone on one thread")
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
    alone = stages_alone(det, files[:8], load) if args.alone and args.runtime == "torch" else None
    print(json.dumps({
        "model": str(args.model), "input": str(args.input), "runtime": args.runtime,
        "threads": args.threads, "n": n, "samples_per_s": round(n / wall, 2),
        "ms_per_sample": round(1000.0 * wall / n, 1),
        "stages_ms": {k: round(v, 1) for k, v in ms.items()},
        "load_average": [load0, os.getloadavg()[0]],
        **({"alone_one_thread_ms": alone} if alone else {}),
    }, indent=1))


def stages_alone(det, files, load) -> dict:  # noqa: ANN001 - a Detector, file triples
    """ms per sample of each stage by itself on one thread, best of 3."""
    import numpy as np

    from cmad.features.geometry import render_geometry
    from cmad.runtime import stage_threads

    def best(fn):  # noqa: ANN001, ANN202
        times = []
        for _ in range(3):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, round(min(times) * 1000.0 / len(files), 1)

    ms: dict[str, float] = {}
    with stage_threads(1):  # torch and FPFH on one thread
        samples, ms["read"] = best(lambda: [load(f) for f in files])
        prep, ms["preprocess"] = best(lambda: det.prepare(samples))
        ext = det.extractor
        images = [np.stack([p.rgb for p in prep])]
        if ext.geometry is not None:
            geo, ms["geometry_render"] = best(lambda: np.stack(
                [render_geometry(p.xyz, p.foreground, ext.geometry) for p in prep]))
            images.append(geo)
        _, ms["cnn"] = best(lambda: ext.cnn.extract(np.concatenate(images)))
        if ext.fpfh is not None:
            _, ms["xyz_features"] = best(lambda: [ext.fpfh.extract(p.xyz, p.foreground)
                                                  for p in prep])
        fm, _ = ext.extract(prep)
        (_, own), _ = best(lambda: det.predict_features(fm, prep, branch_maps=False))
        ms.update({k: round(v, 1) for k, v in own.items()})
    ms["total"] = round(sum(ms.values()), 1)
    return ms


if __name__ == "__main__":
    main()
