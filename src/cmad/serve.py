"""`cmad serve`: a fitted model behind a small HTTP service for a production line.

    POST /predict   multipart/form-data with the fields `rgb` (PNG) and `xyz` (TIFF), as
                    the model needs them; `?map=png|tiff` (or a form field `map`) adds the
                    anomaly map to the answer, base64 in the JSON
    GET  /health    {"status": "ok"} once the model is loaded
    GET  /model     identity, category, threshold, branches, size, cmad version

The answer of /predict comes from `cmad.predict_io.decide`, the function `cmad predict`
uses, so both report the same verdict (and, where the decision rule makes one, the same
mask). `?map=tiff` is the float32 map `cmad predict` writes to maps/<stem>.tiff, byte for
byte; `?map=png` is its overlays/<stem>.png.

Built on the standard library (`http.server.ThreadingHTTPServer`, multipart parsed by
`email`): inference is CPU-bound and runs one request at a time on the one shared model (a
lock), so an async framework would add dependencies and gain nothing; one thread per
connection still decodes uploads and encodes answers beside a running inference
(`--concurrency N` lets N inferences share the model at once). Limits
are checked before a byte of the body is read (413), and every bad upload gets a 4xx with
the message the CLI prints for the same file. Bind to loopback (the default) or put a
reverse proxy with TLS in front: http.server implements only basic security checks.
"""
from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import http.server
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from cmad import __version__
from cmad.data.io import png_bytes, tiff_bytes
from cmad.errors import CmadError, ConfigError, DataError
from cmad.pipeline import CONFIG_NAME, Detector
from cmad.predict_io import PNG_LEVEL, decide, overlay, read_sample

log = logging.getLogger(__name__)

MAX_REQUEST_MB = 64.0
MAX_PIXELS = 20_000_000  # per image: 4472 x 4472; MVTec 3D-AD images are at most 800 x 800
MAP_FORMATS = ("none", "png", "tiff")
_NAME_OK = re.compile(r"[^A-Za-z0-9._ -]")


class RequestError(Exception):
    """A request the service refuses: an HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Upload:
    name: str  # the file name the client sent (sanitised), or the field name
    data: bytes


def _safe_name(name: str | None, default: str) -> str:
    """A client's file name fit for a message: no folders, no control characters."""
    if not name:
        return default
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _NAME_OK.sub("_", base)[:128] or default


def parse_multipart(content_type: str, body: bytes) -> dict[str, Upload | str]:
    """Fields of a multipart/form-data body: file parts as `Upload`, plain fields as str."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"expected multipart/form-data with the fields rgb and xyz, got "
                                f"Content-Type {content_type or 'none'!r}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise RequestError(400, "malformed multipart/form-data body"
                           + (f" ({msg.defects[0].__class__.__name__})" if msg.defects else ""))
    fields: dict[str, Upload | str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            fields[name] = Upload(_safe_name(filename, name), data)
        else:
            fields[name] = data.decode("utf-8", "replace").strip()
    return fields


def _check_pixels(up: Upload, kind: str, max_pixels: int) -> None:
    """Refuse an image whose header promises more than `max_pixels` (before decoding it)."""
    h = w = 0
    try:
        if kind == "xyz":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(up.data)) as tif:
                shape = tif.series[0].shape
            h, w = (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (0, 0)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(up.data)) as img:
                w, h = img.size
    except Exception:  # noqa: BLE001 - unreadable: the reader gives the CLI's message
        return
    if h * w > max_pixels:
        raise RequestError(413, f"{up.name}: image is {w}x{h} (WxH), more than the service's "
                                f"limit of {max_pixels} pixels")


class ModelService:
    """One loaded model shared by every request; inference under a lock (see `predict`)."""

    def __init__(self, model_dir: str | Path, max_pixels: int = MAX_PIXELS,
                 concurrency: int = 1, warmup: bool = True) -> None:
        if concurrency < 1:
            raise ConfigError(f"--concurrency must be a positive integer, got {concurrency}")
        self.model_dir = Path(model_dir)
        self.detector = Detector.load(self.model_dir)
        self.max_pixels = int(max_pixels)
        # How many inferences run at once on the one model. 1 (the default): one at a time,
        # answers exactly those of `cmad predict`. More lets requests share the CPUs; the
        # model is only read while scoring and 80 concurrent requests gave the same bytes
        # as sequential ones (RESULTS.md), but torch's thread setting is process-wide and
        # some stages change it for a moment, so that is measured, not guaranteed.
        self.concurrency = int(concurrency)
        self._lock = threading.BoundedSemaphore(self.concurrency)
        meta = json.loads((self.model_dir / CONFIG_NAME).read_text())
        self.info = {
            "model": str(self.model_dir),
            "identity": meta.get("tensors_sha256"),
            "config_sha256": hashlib.sha256((self.model_dir / CONFIG_NAME).read_bytes()).hexdigest(),
            "category": self.detector.category,
            "categories": [self.detector.category],
            "threshold": self.detector.threshold,
            "modalities": list(self.detector.modalities),
            "branches": list(self.detector.branches),
            "weights": dict(self.detector.weights),
            "working_size": self.detector.config.size,
            "model_bytes": int(sum(p.stat().st_size for p in self.model_dir.iterdir() if p.is_file())),
            "tensor_bytes": self.detector.model_bytes,
            "format_version": meta.get("format_version"),
            "saved_by_cmad": meta.get("cmad_version"),
            "cmad_version": __version__,
            "concurrency": self.concurrency,
        }
        self.started = time.time()
        self.served = 0
        self._count = threading.Lock()
        if warmup:
            self.warmup()

    def warmup(self) -> None:
        """Score one made-up sample, so that the first real request does not pay for the
        kernels' compilation and the allocators' first growth (about 2 s here)."""
        from cmad.types import Sample, SamplePaths

        s = self.detector.config.size
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        xyz = np.stack([xx * 0.1, yy * 0.1, 0.5 + 0.01 * np.sin(6 * xx) * np.cos(5 * yy)], axis=2)
        xyz[: s // 8] = 0.0  # some background, as a real cloud has
        valid = np.any(xyz != 0, axis=2)
        has = self.detector.modalities
        sample = Sample(rgb=rng.integers(60, 200, (s, s, 3), dtype=np.uint8) if "rgb" in has else None,
                        xyz=xyz.astype(np.float32) if "xyz" in has else None,
                        valid=valid if "xyz" in has else np.ones((s, s), bool),
                        gt=np.zeros((s, s), bool), label=0, defect_type="unknown", stem="warmup",
                        category="input", split="predict", paths=SamplePaths(None, None, None))
        t = time.perf_counter()
        try:
            with self._lock:
                self.detector.predict([sample], branch_maps=False)
        except Exception as exc:  # noqa: BLE001 - a warm-up failure only costs the first request
            log.warning("warm-up on a made-up sample failed (%s); the first request will be slow", exc)
            return
        log.info("warmed up in %.2f s", time.perf_counter() - t)

    def predict(self, fields: dict[str, Upload | str], map_format: str = "none") -> dict:
        """The JSON answer for one upload (raises RequestError or DataError on bad input)."""
        if map_format not in MAP_FORMATS:
            raise RequestError(400, f"map: must be one of {', '.join(MAP_FORMATS)}, got {map_format!r}")
        ups: dict[str, Upload] = {}
        for m in self.detector.modalities:
            up = fields.get(m)
            if not isinstance(up, Upload):
                need = " and ".join(f"{x} ({'PNG' if x == 'rgb' else 'TIFF'})"
                                    for x in self.detector.modalities)
                raise RequestError(400, f"the model needs {need}: send them as multipart "
                                        f"file fields {', '.join(self.detector.modalities)}"
                                   + ("" if up is None else f"; field {m} is not a file"))
            _check_pixels(up, m, self.max_pixels)
            ups[m] = up
        rgb, xyz = ups.get("rgb"), ups.get("xyz")
        stem = Path((rgb or xyz).name).stem  # type: ignore[union-attr]
        sample = read_sample(Path(rgb.name) if rgb else None, Path(xyz.name) if xyz else None, stem,
                             rgb_data=rgb.data if rgb else None, xyz_data=xyz.data if xyz else None)
        t = time.perf_counter()
        with self._lock:
            pred = self.detector.predict([sample], branch_maps=False)[0]
        infer_ms = (time.perf_counter() - t) * 1000.0
        decision = self.detector.decision
        d = decide(pred, decision)
        out = {"stem": stem, **d.row(), "infer_ms": round(infer_ms, 2)}
        if map_format == "tiff":
            out["map"] = _b64("tiff", pred.anomaly_map.shape, tiff_bytes(pred.anomaly_map.astype(np.float32)))
        elif map_format == "png":
            out["map"] = _b64("png", pred.anomaly_map.shape,
                              png_bytes(overlay(sample.rgb, pred.anomaly_map, decision, pred.score),
                                        PNG_LEVEL))
        if map_format != "none":  # the predicted defect mask, as predict writes it
            out["mask"] = _b64("png", d.mask.shape, png_bytes(d.mask.astype(np.uint8) * 255, PNG_LEVEL))
        with self._count:
            self.served += 1
        return out


def _b64(fmt: str, shape: tuple[int, ...], data: bytes) -> dict:
    return {"format": fmt, "shape": [int(s) for s in shape], "base64": base64.b64encode(data).decode()}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"cmad/{__version__}"
    timeout = 60  # seconds a client may stall while sending (the socket's timeout)
    server: Server

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, obj: dict, close: bool = False) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        if status >= 500:
            log.error("%s %s: %s", self.command, self.path, message)
        else:
            log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._send(status, {"error": message, "status": status}, close=close)

    def _route(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    # ------------------------------------------------------------------ methods
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = self._route()
        svc = self.server.service
        if route == "/health":
            self._send(200, {"status": "ok", "uptime_s": round(time.time() - svc.started, 1),
                             "served": svc.served})
        elif route == "/model":
            self._send(200, svc.info)
        elif route == "/predict":
            self._error(405, "POST an rgb PNG and an xyz TIFF as multipart/form-data to /predict")
        else:
            self._error(404, f"no such endpoint {route!r}; try GET /health, GET /model, POST /predict")

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if route != "/predict":
            self._error(404, f"no such endpoint {route!r}; POST goes to /predict")
            return
        try:
            body = self._read_body()
        except RequestError as exc:  # the body was not read: close the connection
            self._error(exc.status, exc.message, close=True)
            if exc.status == 413:
                self._drain()
            return
        try:
            query = parse_qs(urlsplit(self.path).query)
            fields = parse_multipart(self.headers.get("Content-Type", ""), body)
            fmt = query.get("map", [None])[-1] or fields.get("map") or "none"
            if not isinstance(fmt, str):
                raise RequestError(400, "map: must be a plain form field, not a file")
            answer = self.server.service.predict(fields, map_format=fmt.lower())
        except RequestError as exc:
            self._error(exc.status, exc.message)
        except CmadError as exc:  # a bad upload: the CLI's message for the same file
            self._error(422 if isinstance(exc, DataError) else 400, str(exc))
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("POST /predict failed")
            self._error(500, "internal error while scoring the sample (see the service log)")
        else:
            self._send(200, answer)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized upload before the client sends it (curl asks first)."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_request_bytes:
            self._error(413, self._too_big(int(length)), close=True)
            return False
        return super().handle_expect_100()

    def _drain(self, max_s: float = 5.0) -> None:
        """Read and drop a refused upload for a few seconds (at most 4 limits' worth), so
        that a client still sending it reads the 413 rather than a broken connection."""
        try:
            left = min(int(self.headers.get("Content-Length", "0")), 4 * self.server.max_request_bytes)
        except ValueError:
            return
        deadline = time.monotonic() + max_s
        try:
            self.connection.settimeout(1.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _too_big(self, n: int) -> str:
        return (f"request is {n} bytes, more than the service's limit of "
                f"{self.server.max_request_bytes} bytes (--max-request-mb)")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise RequestError(411, "send the upload with a Content-Length (chunked bodies are "
                                    "not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_request_bytes:
            raise RequestError(413, self._too_big(n))
        body = self.rfile.read(n)
        if len(body) != n:
            raise RequestError(400, f"request body ended after {len(body)} of {n} bytes")
        return body


class Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server that holds the shared `ModelService`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: ModelService, host: str = "127.0.0.1", port: int = 8000,
                 max_request_mb: float = MAX_REQUEST_MB) -> None:
        self.service = service
        self.max_request_bytes = int(max_request_mb * 1024 * 1024)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_in_thread(server: Server) -> threading.Thread:
    """Serve in a daemon thread (tests, the load test); stop with server.shutdown()."""
    t = threading.Thread(target=server.serve_forever, name="cmad-serve", daemon=True)
    t.start()
    return t
