"""Run by tests/test_crash.py in a subprocess that the test kills with SIGKILL.

    crash_worker.py save SRC_MODEL DST_MODEL      load a model and save it into DST
    crash_worker.py predict MODEL INPUT OUT       `cmad predict --input INPUT --out OUT`

The test sets CMAD_TEST_PAUSE_AT (see `cmad.runtime.pause_point`) to stop it at one point.
"""
import sys

if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "save":
        from cmad.pipeline import Detector

        Detector.load(args[0]).save(args[1])
    elif mode == "predict":
        from cmad.cli import main

        sys.argv = ["cmad", "predict", "--model", args[0], "--input", args[1], "--out", args[2],
                    "--quiet", "--threads", "1"]
        main()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
