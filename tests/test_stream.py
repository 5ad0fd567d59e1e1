"""Streaming predict: files read and preprocessed a batch ahead in a worker thread give the
same predictions as `predict`, in order, and a bad file stops the stream with its error
(no output folder left behind)."""
import numpy as np
import pytest

from cmad.errors import DataError
from cmad.predict_io import input_files, read_sample, write_outputs


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    """An input folder (rgb/, xyz/) with the test files of the fitted tiny category."""
    import shutil

    from cmad.data.mvtec3d import Category

    cat = Category(tiny_model[1])
    out = tmp_path_factory.mktemp("stream") / "input"
    (out / "rgb").mkdir(parents=True)
    (out / "xyz").mkdir()
    for i, s in enumerate(cat.samples("test")):
        shutil.copy(s.paths.rgb, out / "rgb" / f"{i:03d}.png")
        shutil.copy(s.paths.xyz, out / "xyz" / f"{i:03d}.tiff")
    return out


def test_iter_predict_matches_predict(tiny_model, folder):
    from cmad.pipeline import Detector

    det = Detector.load(tiny_model[0])
    files = input_files(None, None, folder, det.modalities)
    assert len(files) > det.config.batch_size  # more than one batch: the worker runs ahead
    ref = det.predict([read_sample(*f) for f in files], branch_maps=False)
    got = list(det.iter_predict(files, load=lambda f: read_sample(*f)))
    assert [s.stem for s, _ in got] == [f[2] for f in files]
    assert [p.score for _, p in got] == [p.score for p in ref]
    for (_, p), r in zip(got, ref):
        assert np.array_equal(p.anomaly_map, r.anomaly_map)
    assert np.ptp([p.score for p in ref]) > 0


def test_a_bad_file_in_a_later_batch_stops_the_stream(tiny_model, folder, tmp_path):
    import shutil

    from cmad.pipeline import Detector

    det = Detector.load(tiny_model[0])
    bad = tmp_path / "input"
    shutil.copytree(folder, bad)
    files = input_files(None, None, bad, det.modalities)
    broken = files[det.config.batch_size][0]  # the first RGB image of the second batch
    broken.write_bytes(b"not a png")
    pairs = det.iter_predict(files, load=lambda f: read_sample(*f))
    with pytest.raises(DataError) as err:
        write_outputs(tmp_path / "out", pairs, det.decision)
    assert str(broken) in str(err.value)
    assert not (tmp_path / "out").exists()
    # the user's files are left as they were, the broken one included
    assert broken.read_bytes() == b"not a png"
    for rgb, xyz, stem in files:
        if rgb != broken:
            assert rgb.read_bytes() == (folder / "rgb" / f"{stem}.png").read_bytes()
        assert xyz.read_bytes() == (folder / "xyz" / f"{stem}.tiff").read_bytes()


def test_the_stream_leaves_the_worker_a_core_and_restores_the_threads():
    import torch

    from cmad.pipeline import stream_batches

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def step(prep):
            seen.append(torch.get_num_threads())
            return list(prep), {}

        out = list(stream_batches(list(range(5)), 2, list, step, "t", False))
        assert [r for _, r, _ in out] == [[0, 1], [2, 3], [4]]
        # the last step has no worker beside it
        assert seen == [1, 1, 2] and torch.get_num_threads() == 2
        # one batch: no worker runs beside the model, so torch keeps its threads
        seen.clear()
        list(stream_batches([0, 1], 2, list, step, "t", False))
        assert seen == [2] and torch.get_num_threads() == 2
        # the caller's code between batches runs on every thread
        gen = stream_batches(list(range(5)), 2, list, step, "t", False)
        next(gen)
        assert torch.get_num_threads() == 2
        gen.close()
        # a failing step still restores them
        with pytest.raises(RuntimeError):
            list(stream_batches(list(range(5)), 2, list,
                                lambda p: (_ for _ in ()).throw(RuntimeError("x")), "t", False))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_batch_alone_equals_the_same_batch_in_a_stream(tiny_model):
    """A batch predicted alone (all torch threads) and inside a stream (one fewer beside
    the worker) give the same scores and maps."""
    from cmad.data.mvtec3d import Category
    from cmad.pipeline import Detector
    from cmad.runtime import set_threads, thread_limit

    before = thread_limit()
    set_threads(2)
    try:
        det = Detector.load(tiny_model[0])
        test = Category(tiny_model[1]).samples("test")
        n = det.config.batch_size
        assert len(test) > n
        alone = det.predict(test[:n], branch_maps=False)
        streamed = det.predict(test, branch_maps=False)[:n]
        assert [p.score for p in alone] == [p.score for p in streamed]
        assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(alone, streamed))
    finally:
        set_threads(before)
