"""Load test of `cmad serve` on loopback: N requests from C concurrent clients.

    python scripts/loadtest.py --model MODEL --input FOLDER [--requests 500] [--clients 8]
        [--max-seconds 300] [--threads 1] [--concurrency 1] [--map none|png|tiff] [--url URL]

Starts `cmad serve --port 0` as a child process (or uses a running service at --url),
waits for /health, then sends POST /predict with the rgb/xyz pairs of FOLDER (rgb/*.png,
xyz/*.tiff, cycled) from C client threads, each on one keep-alive connection, until
--requests answers or --max-seconds. Prints one JSON object: p50 / p90 / p99 latency (ms),
throughput (requests/s), the error count and the status codes. Exit code 1 on any error.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit


def multipart(rgb: tuple[str, bytes], xyz: tuple[str, bytes]) -> tuple[str, bytes]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{n}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
             for k, (n, data) in (("rgb", rgb), ("xyz", xyz))]
    return f"multipart/form-data; boundary={b}", b"".join(parts) + f"--{b}--\r\n".encode()


def start_child(model: Path, threads: int, concurrency: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cmad.cli", "serve", "--model", str(model), "--port", "0",
           "--threads", str(threads), "--concurrency", str(concurrency), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT"
    if " on http://" not in line:
        proc.kill()
        sys.exit(f"error: the service did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def wait_health(url: str, timeout: float = 120.0) -> None:
    u = urlsplit(url)
    t = time.time()
    while time.time() - t < timeout:
        try:
            c = HTTPConnection(u.hostname, u.port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"error: {url}/health did not answer within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--input", type=Path, required=True, help="folder with rgb/ and xyz/")
    ap.add_argument("--url", help="a running service (default: start one)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--map", default="none", choices=("none", "png", "tiff"))
    ap.add_argument("--concurrency", type=int, default=1, help="the service's --concurrency")
    a = ap.parse_args()
    rgbs = sorted((a.input / "rgb").glob("*.png"))
    pairs = [((f"{p.stem}.png", p.read_bytes()),
              (f"{p.stem}.tiff", (a.input / "xyz" / f"{p.stem}.tiff").read_bytes())) for p in rgbs]
    if not pairs:
        sys.exit(f"error: {a.input}: no rgb/*.png inside")
    bodies = [multipart(*p) for p in pairs]
    proc = None
    if a.url:
        url = a.url
    else:
        if a.model is None:
            sys.exit("error: --model or --url is required")
        proc, url = start_child(a.model, a.threads, a.concurrency)
    wait_health(url)
    u = urlsplit(url)
    path = "/predict" + ("" if a.map == "none" else f"?map={a.map}")
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(a.requests))
    deadline = time.time() + a.max_seconds

    def client() -> None:
        conn = HTTPConnection(u.hostname, u.port, timeout=120)
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            ctype, body = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                data = r.read()
                ms = (time.perf_counter() - t) * 1000.0
                ok = r.status == 200 and "score" in json.loads(data)
            except (OSError, ValueError) as exc:
                ms, ok = (time.perf_counter() - t) * 1000.0, False
                r = None
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = HTTPConnection(u.hostname, u.port, timeout=120)
            with lock:
                lat.append(ms)
                code = r.status if r is not None else -1
                codes[code] = codes.get(code, 0) + 1
                if r is not None and not ok:
                    errors.append(f"HTTP {r.status}: {data[:200]!r}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    lat.sort()

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")

    res = {"requests": len(lat), "clients": a.clients, "samples": len(pairs), "map": a.map,
           "concurrency": None if a.url else a.concurrency,
           "server_threads": None if a.url else a.threads,
           "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 2) if wall else None,
           "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
           "max_ms": round(lat[-1], 1) if lat else None,
           "errors": len(errors), "status_codes": codes, "first_errors": errors[:3],
           "cpus": len(os.sched_getaffinity(0)), "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(res, indent=2))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
