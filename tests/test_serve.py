"""`cmad serve` on loopback: /health, /model, /predict (the verdict and map of `cmad predict`),
bad uploads -> 4xx with the CLI's message, size limits, concurrent requests."""
from __future__ import annotations

import base64
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest

from cmad.pipeline import Detector
from cmad.predict_io import collect_inputs, write_outputs
from cmad.serve import ModelService, Server, parse_multipart, start_in_thread


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def server(model):
    srv = Server(ModelService(model[0]), host="127.0.0.1", port=0, max_request_mb=1.0)
    start_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def _multipart(fields: dict[str, tuple[str, bytes] | str]) -> tuple[str, bytes]:
    b = uuid.uuid4().hex
    out = []
    for name, v in fields.items():
        if isinstance(v, tuple):
            out.append(f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{v[0]}"\r\n'
                       f"Content-Type: application/octet-stream\r\n\r\n".encode() + v[1] + b"\r\n")
        else:
            out.append(f'--{b}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    out.append(f"--{b}--\r\n".encode())
    return f"multipart/form-data; boundary={b}", b"".join(out)


def _request(srv, method, path, fields=None, headers=None, body=None):
    host, port = srv.server_address[:2]
    conn = HTTPConnection(host, port, timeout=120)
    hdrs = dict(headers or {})
    if fields is not None:
        ctype, body = _multipart(fields)
        hdrs["Content-Type"] = ctype
    conn.request(method, path, body=body, headers=hdrs)
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def _files(cat_dir: Path, defect: str = "cut", stem: str = "000"):
    d = cat_dir / "test" / defect
    return (d / "rgb" / f"{stem}.png").read_bytes(), (d / "xyz" / f"{stem}.tiff").read_bytes()


def test_health_and_model(server, model):
    assert _request(server, "GET", "/health")[1]["status"] == "ok"
    status, info = _request(server, "GET", "/model")
    det = Detector.load(model[0])
    assert status == 200
    assert info["category"] == det.category == model[1].name
    assert info["threshold"] == det.threshold
    assert info["branches"] == list(det.branches)
    assert len(info["identity"]) == 64 and info["model_bytes"] > info["tensor_bytes"] > 0
    assert _request(server, "GET", "/nope")[0] == 404


def test_predict_matches_cmad_predict(server, model, tmp_path):
    """Score, verdict and the float32 TIFF map are those `cmad predict` writes, byte for byte."""
    m, cat_dir = model
    det = Detector.load(m)
    d = cat_dir / "test" / "cut"
    samples = collect_inputs(d / "rgb" / "000.png", d / "xyz" / "000.tiff", None, det.modalities)
    out, _ = write_outputs(tmp_path / "out", zip(samples, det.predict(samples)), det.decision)
    row = json.loads((out / "scores.json").read_text())["samples"][0]
    rgb, xyz = _files(cat_dir)
    status, ans = _request(server, "POST", "/predict?map=tiff",
                           {"rgb": ("000.png", rgb), "xyz": ("000.tiff", xyz)})
    assert status == 200, ans
    assert ans["score"] == row["score"] and ans["anomalous"] == row["anomalous"]
    assert ans["threshold"] == det.threshold
    assert base64.b64decode(ans["map"]["base64"]) == (out / "maps" / "000.tiff").read_bytes()
    # the same predicted defect mask and area as predict writes
    assert base64.b64decode(ans["mask"]["base64"]) == (out / "masks" / "000.png").read_bytes()
    assert ans["defect_area_px"] == row["defect_area_px"] and ans["verdict"] == row["verdict"]
    # the map as a PNG overlay, asked for by a form field
    status, ans = _request(server, "POST", "/predict",
                           {"rgb": ("000.png", rgb), "xyz": ("000.tiff", xyz), "map": "png"})
    assert status == 200 and ans["map"]["format"] == "png"
    assert base64.b64decode(ans["map"]["base64"]) == (out / "overlays" / "000.png").read_bytes()
    assert "map" not in _request(server, "POST", "/predict",
                                 {"rgb": ("000.png", rgb), "xyz": ("000.tiff", xyz)})[1]


def test_bad_uploads_get_4xx_with_the_cli_message(server, model, tmp_path):
    rgb, xyz = _files(model[1])
    # a PNG where the point cloud should be: the reader's message, naming the uploaded file
    status, ans = _request(server, "POST", "/predict", {"rgb": ("a.png", rgb), "xyz": ("b.png", rgb)})
    assert status == 422
    from cmad.data.io import read_xyz
    from cmad.errors import DataError

    (tmp_path / "b.png").write_bytes(rgb)
    with pytest.raises(DataError) as cli:
        read_xyz(tmp_path / "b.png")
    assert ans["error"] == str(cli.value).replace(str(tmp_path / "b.png"), "b.png")
    status, ans = _request(server, "POST", "/predict", {"rgb": ("x.png", b"not an image"),
                                                        "xyz": ("x.tiff", xyz)})
    assert status == 422 and ans["error"].startswith("x.png: unreadable image")
    assert "BytesIO" not in ans["error"]
    status, ans = _request(server, "POST", "/predict", {"rgb": ("x.png", rgb)})
    assert status == 400 and "xyz" in ans["error"]
    status, ans = _request(server, "POST", "/predict?map=jpeg",
                           {"rgb": ("a.png", rgb), "xyz": ("a.tiff", xyz)})
    assert status == 400 and "map" in ans["error"]
    status, ans = _request(server, "POST", "/predict", body=b"x", headers={"Content-Type": "text/plain"})
    assert status == 415
    # over the 1 MB limit: refused from the header, the body never read
    status, ans = _request(server, "POST", "/predict", fields={"rgb": ("a.png", b"\0" * (1 << 20)),
                                                               "xyz": ("a.tiff", xyz)})
    assert status == 413 and "limit" in ans["error"]
    # the service still answers
    assert _request(server, "GET", "/health")[0] == 200


def test_multipart_keeps_binary_bytes_exact():
    data = bytes(range(256)) * 40 + b"\r\n--\r\n\r\n"
    ctype, body = _multipart({"rgb": ("a b.png", data), "map": "tiff"})
    fields = parse_multipart(ctype, body)
    assert fields["rgb"].data == data and fields["rgb"].name == "a b.png"
    assert fields["map"] == "tiff"


def test_concurrent_requests_all_answer_the_same(server, model):
    rgb, xyz = _files(model[1])
    rgb2, xyz2 = _files(model[1], "good")
    jobs = [(rgb, xyz), (rgb2, xyz2)] * 4
    barrier = threading.Barrier(len(jobs))

    def one(job):
        barrier.wait()
        return _request(server, "POST", "/predict", {"rgb": ("a.png", job[0]), "xyz": ("a.tiff", job[1])})

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert all(s == 200 for s, _ in answers)
    scores = [a["score"] for _, a in answers]
    assert len(set(scores[0::2])) == 1 and len(set(scores[1::2])) == 1
    assert scores[0] != scores[1]


def test_the_cli_imports_no_ray_and_no_server():
    import subprocess
    import sys

    code = ("import sys, cmad.cli, cmad.bench, cmad.predict_io, cmad.serve; "
            "print(sorted(m for m in ('ray', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_serve_and_executor_errors(tmp_path):
    from typer.testing import CliRunner

    from cmad.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "none"), "--threads", "1"])
    assert r.exit_code == 2 and "config.json: missing" in r.output
    r = runner.invoke(app, ["serve", "--model", str(tmp_path), "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    r = runner.invoke(app, ["predict", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
                            "--input", str(tmp_path), "--executor", "dask", "--threads", "1"])
    assert r.exit_code == 2 and "--executor must be one of local, ray" in r.output
