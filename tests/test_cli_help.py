"""Help that explains: every option of every command has help text and shows its default,
flags are written as flags, one name means one thing, and bench lists its methods."""
from __future__ import annotations

import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cmad.cli import app

runner = CliRunner()
COMMAND = get_command(app)
NAMES = sorted(COMMAND.commands)


def _help(*args: str) -> str:
    r = runner.invoke(app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    return r.output


def _visible(cmd) -> list:
    return [p for p in cmd.params if not getattr(p, "hidden", False)]


def test_every_command_is_walked() -> None:
    assert {"info", "synth", "features", "fit", "evaluate", "predict", "bench", "demo"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    cmd = COMMAND.commands[name]
    text = _help(name)
    assert "<bool>" not in text, "flags are written as flags (--json, not --json <bool>)"
    for p in _visible(cmd):
        assert p.help and p.help.strip(), f"{name} {p.opts[0]}: no help text"
        if p.name == "help":
            continue
        flag = getattr(p, "is_flag", False)
        if not p.required and not flag:
            assert p.default is not None or isinstance(p.show_default, str), \
                f"{name} {p.opts[0]}: a default of None must say what it means (show_default)"
        # the rendered help says the default (flags default to off)
        entry = re.search(re.escape(p.opts[0]) + r"\b(.*?)(?=\n  -|\Z)", text, re.S)
        assert entry, f"{name} {p.opts[0]} missing from --help"
        if p.required:
            assert "[required]" in entry.group(1)
        elif not flag:
            assert "[default:" in entry.group(1), f"{name} {p.opts[0]}: default not shown"


def test_flags_take_no_value() -> None:
    assert re.search(r"^\s+--json\s{2,}print one JSON object", _help("info"), re.M)
    r = runner.invoke(app, ["info", "--json", "true"])
    assert r.exit_code != 0  # a flag: `true` is an unexpected extra argument


def test_bench_help_lists_every_method() -> None:
    from cmad.bench import DEMO_METHODS, METHODS

    for name in ("bench", "demo"):
        text = " ".join(_help(name).split())
        # names may wrap at a hyphen in the rendered help
        flat = text.replace("- ", "-")
        for m in METHODS:
            assert m in flat, f"{name} --help does not list {m}"
    assert ",".join(DEMO_METHODS) in " ".join(_help("demo").split()).replace("- ", "-")


def test_one_name_for_one_idea() -> None:
    opts = {n: {o for p in _visible(COMMAND.commands[n]) for o in p.opts} for n in NAMES}
    # --size is the working resolution in pixels wherever it appears
    for n in ("bench", "features", "fit"):
        assert "--size" in opts[n]
        assert "working resolution" in _help(n)
    assert "--maps-resolution" in opts["evaluate"]
    assert not any("--resolution" in o for o in opts.values()), "old name still shown"
    # the synthetic data presets are --preset (not --size)
    assert "--preset" in opts["synth"] and "--preset" in opts["demo"]
    assert "--size" not in opts["synth"] and "--size" not in opts["demo"]
    # --quiet everywhere there is progress output
    for n in ("synth", "features", "fit", "evaluate", "predict", "bench", "demo"):
        assert "--quiet" in opts[n], n


def test_default_cache_folder_is_shown() -> None:
    for name in ("fit", "evaluate", "bench"):
        assert "$CMAD_CACHE_DIR, else ~/.cache/cmad" in " ".join(_help(name).split())


def test_old_option_names_still_work(tmp_path) -> None:
    r = runner.invoke(app, ["synth", "--out", str(tmp_path / "d"), "--size", "nonesuch"])
    assert r.exit_code == 2
    assert "synth --size is deprecated; use --preset" in r.output
    assert "--preset must be one of" in r.output and "'nonesuch'" in r.output


@pytest.mark.parametrize("argv,says", [
    (["predict", "--model", "m", "--input", "i", "--threshold", "abc"], "'--threshold'"),
    (["fitt"], "No such command 'fitt'"),
    (["fit", "--bogus", "1"], "--bogus"),
    (["fit"], "Missing option '--data'"),
])
def test_bad_usage_is_one_error_line(argv, says, monkeypatch, capsys) -> None:
    """The console script (`cmad.cli.main`): a bad option value, an unknown command or a
    missing option is one `error:` line naming it, exit 2, no usage block or traceback."""
    from cmad.cli import main

    monkeypatch.setattr("sys.argv", ["cmad", *argv])
    with pytest.raises(SystemExit) as ex:
        main()
    err = capsys.readouterr().err
    assert ex.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert "Traceback" not in err and "Usage:" not in err


def test_main_runs_a_command_and_shows_help(monkeypatch, capsys) -> None:
    from cmad.cli import main

    for argv, code in ((["--help"], 0), ([], 0), (["info", "--data", "/nonexistent"], 2)):
        monkeypatch.setattr("sys.argv", ["cmad", *argv])
        with pytest.raises(SystemExit) as ex:
            main()
        assert ex.value.code == code, argv
    out = capsys.readouterr()
    assert "Usage: " in out.out and "COMMAND" in out.out and "error: /nonexistent" in out.err


@pytest.mark.parametrize("command", [["fit", "--data", "d", "--category", "c", "--out", "m"],
                                     ["features", "--data", "d", "--category", "c"],
                                     ["bench", "--data", "d", "--out", "o"]])
def test_a_huge_working_size_is_refused_before_any_work(command) -> None:
    r = runner.invoke(app, [*command, "--size", "100000"])
    assert r.exit_code == 2 and "--size must be a multiple of 8 from 32 to 1024" in r.output, r.output


def test_version() -> None:
    from cmad import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cmad {__version__}"
