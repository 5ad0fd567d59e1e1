"""How far a second core carries a saved model's predict stream: the same files split over
P separate processes, each on T threads, against one process (data parallelism).

    python scripts/processes.py --model MODEL --input FOLDER [--procs 1,2] [--threads 1]

Each process loads the model, warms up on 8 samples, waits for the others, then streams its
share of FOLDER (every P-th file) through `iter_predict`. Prints one JSON object: per
process count, the total samples/s over the common wall clock and each process's own rate.
Round 13 (RESULTS.md) used it to show that two processes reach 1.42-1.53x one (while, in a
scratch timing, a Python loop and a matrix product reached 2x: the stages contend for
cache and memory).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

TIMEOUT_S = 600.0  # a worker that has not started or finished by then has failed


def _work(model: str, files: list, barrier, queue, threads: int) -> None:  # noqa: ANN001
    from cmad.export import load_predictor
    from cmad.predict_io import read_sample
    from cmad.runtime import set_threads

    set_threads(threads)
    det = load_predictor(Path(model), "torch")

    def load(f):  # noqa: ANN001, ANN202
        return read_sample(*f)

    list(det.iter_predict(files[:8], load=load))
    barrier.wait(timeout=TIMEOUT_S)
    t0 = time.perf_counter()
    n = sum(1 for _ in det.iter_predict(files, load=load))
    queue.put((n, time.perf_counter() - t0))


def run(model: Path, folder: Path, procs: int, threads: int) -> dict:
    from cmad.export import load_predictor
    from cmad.predict_io import input_files

    det = load_predictor(model, "torch")  # a bad model fails here, not in every worker
    files = input_files(None, None, folder, det.modalities)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_work, args=(str(model), files[i::procs], barrier, queue, threads))
          for i in range(procs)]
    for p in ps:
        p.start()
    try:
        barrier.wait(timeout=TIMEOUT_S)
    except threading.BrokenBarrierError:
        for p in ps:
            p.terminate()
        raise SystemExit(f"a worker failed before the start (exit codes "
                         f"{[p.exitcode for p in ps]})") from None
    t0 = time.perf_counter()
    res = [queue.get(timeout=TIMEOUT_S) for _ in ps]
    wall = time.perf_counter() - t0
    for p in ps:
        p.join()
    return {"procs": procs, "threads": threads,
            "samples_per_s": round(sum(n for n, _ in res) / wall, 2),
            "per_process": [round(n / s, 2) for n, s in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    runs = [run(args.model, args.input, int(p), args.threads) for p in args.procs.split(",")]
    print(json.dumps({"model": str(args.model), "runs": runs,
                      "load_average": [load0, os.getloadavg()[0]]}, indent=1))


if __name__ == "__main__":
    main()
