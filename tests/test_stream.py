"""Streaming predict: batches read, preprocessed and scored side by side on worker threads
give the same predictions as `predict`, in order, and a bad file stops the stream with its
error (no output folder left behind)."""
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


def test_stages_side_by_side_share_the_threads_and_the_caller_keeps_its_own():
    import threading

    import torch

    from cmad.pipeline import stream_batches
    from cmad.runtime import cpu_threads, set_threads, thread_limit

    before = thread_limit()
    set_threads(2)
    try:
        seen = {}
        stepping = threading.Event()

        def prepare(batch):
            if batch[0] == 2:  # batch 1 is read while batch 0 is stepped
                assert stepping.wait(10)
            return list(batch)

        def step(prep):
            seen[prep[0]] = (torch.get_num_threads(), cpu_threads())
            if prep[0] == 0:
                stepping.set()
            return list(prep), {}

        gen = stream_batches(list(range(5)), 2, prepare, step, "t", False)
        assert next(gen)[1] == [0, 1]
        # the caller's code between batches runs on every thread
        assert torch.get_num_threads() == 2 and cpu_threads() == 2
        assert [r for _, r, _ in gen] == [[2, 3], [4]]
        # batch 0 was stepped beside batch 1's reading: one torch and one FPFH thread
        assert seen[0] == (1, 1)
        # one batch: its step runs alone and takes both
        seen.clear()
        assert [r for _, r, _ in stream_batches([0, 1], 2, list, step, "t", False)] == [[0, 1]]
        assert seen == {0: (2, 2)}
        assert torch.get_num_threads() == 2
        assert not [t for t in threading.enumerate() if t.name.startswith("cmad-stage")]
    finally:
        set_threads(before)


def test_blas_runs_on_one_thread_while_stages_run_side_by_side():
    """OpenBLAS's own threads would take the cores the stages share: one BLAS thread while
    the stream runs, the thread limit's again after it."""
    import numpy  # noqa: F401 - loads numpy's OpenBLAS
    from threadpoolctl import threadpool_info

    from cmad.pipeline import stream_batches
    from cmad.runtime import set_threads, thread_limit

    def blas() -> set[int]:
        return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

    before = thread_limit()
    set_threads(2)
    try:
        outside = blas()
        assert outside, "no BLAS library loaded"
        inside = []

        def step(prep):
            inside.append(blas())
            return list(prep), {}

        assert len(list(stream_batches(list(range(6)), 2, list, step, "t", False))) == 3
        assert inside and all(b == {1} for b in inside)
        assert blas() == outside
        # two streams that overlap: the limit holds until the last one is done
        first = stream_batches(list(range(6)), 2, list, step, "t", False)
        second = stream_batches(list(range(6)), 2, list, step, "t", False)
        next(first)
        next(second)
        assert len(list(first)) == 2 and blas() == {1}
        assert len(list(second)) == 2 and blas() == outside
        assert all(b == {1} for b in inside)
    finally:
        set_threads(before)


def test_set_threads_none_gives_torch_and_blas_back_their_own_counts():
    import numpy  # noqa: F401 - loads numpy's OpenBLAS
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from cmad.runtime import set_threads, thread_limit

    def blas() -> set[int]:
        return {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}

    before = thread_limit()
    set_threads(None)
    torch_own, blas_own = torch.get_num_threads(), blas()
    # a default of 3 tells a real restore from a coincidence with the limits below
    with threadpool_limits(limits=3, user_api="blas"):
        torch.set_num_threads(3)
        try:
            set_threads(1)
            assert torch.get_num_threads() == 1 and blas() == {1} and thread_limit() == 1
            set_threads(2)
            assert torch.get_num_threads() == 2 and blas() == {2}
            set_threads(None)
            assert torch.get_num_threads() == 3 and blas() == {3} and thread_limit() is None
            set_threads(None)  # nothing left to restore
            assert torch.get_num_threads() == 3 and blas() == {3}
        finally:
            set_threads(None)
            torch.set_num_threads(torch_own)
    assert blas() == blas_own
    set_threads(before)


def test_an_error_comes_up_with_its_batch_after_the_ones_before_it():
    import threading

    import torch

    from cmad.pipeline import stream_batches

    threads = torch.get_num_threads()

    def prepare(batch):
        if batch[0] == 4:
            raise DataError("b.png", "broken")
        return list(batch)

    def step(prep):
        if prep[0] == 6:
            raise RuntimeError("step failed")
        return list(prep), {}

    got = []
    with pytest.raises(DataError, match="broken"):
        for _, r, _ in stream_batches(list(range(10)), 2, prepare, step, "t", False):
            got.append(r)
    assert got == [[0, 1], [2, 3]]
    got.clear()
    with pytest.raises(RuntimeError, match="step failed"):
        for _, r, _ in stream_batches([0, 1, 2, 3, 6, 7, 8], 2, list, step, "t", False):
            got.append(r)
    assert got == [[0, 1], [2, 3]]
    # a stream closed part-way stops its workers; no stage thread is left behind
    gen = stream_batches(list(range(20)), 2, list, step, "t", False)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("cmad-stage")]
    assert torch.get_num_threads() == threads


def test_threads_started_after_a_stream_begin_with_the_callers_count():
    """Every torch.set_num_threads (the workers' shares too) also sets the count threads
    started later begin with; the stream sets the caller's back at its end."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cmad.stages import staged

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def one_thread(b):  # as a worker's share does, and leaves it so
            torch.set_num_threads(1)
            return b

        list(staged(list(range(6)), [lambda b: b, one_thread], 2))
        with ThreadPoolExecutor(1) as fresh:
            assert fresh.submit(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_base_exception_in_a_stage_comes_up_with_its_batch():
    from cmad.stages import staged

    class Stop(BaseException):
        pass

    def step(b):
        if b == 3:
            raise Stop
        return b

    got = []
    with pytest.raises(Stop):
        for b in staged(list(range(8)), [lambda b: b, step], 2):
            got.append(b)
    assert got == [0, 1, 2]


def test_staged_keeps_batch_order_whatever_order_the_tasks_finish_in():
    import random
    import time

    from cmad.stages import staged

    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(12)]

    def slow(k):
        time.sleep(delays[k])
        return k

    for threads in (1, 2, 4):
        assert list(staged(list(range(12)), [slow, lambda k: k * 10, lambda k: k + 1],
                           threads)) == [10 * k + 1 for k in range(12)]
    assert list(staged([], [slow], 2)) == []


def test_a_batch_alone_equals_the_same_batch_in_a_stream(tiny_model):
    """A batch predicted alone (all torch threads) and inside a stream (one thread, beside
    the next batch's work) give the same scores and maps."""
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
