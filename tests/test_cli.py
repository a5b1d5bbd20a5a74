"""The ``sfoptim`` command as a new user meets it: arguments are checked before
any training, ``--help`` shows the defaults, progress goes only to a terminal."""

import os
import struct
import subprocess
import sys
import threading

import pytest

import sfoptim
from sfoptim import demo


def _cli(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "sfoptim.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture
def no_training(monkeypatch):
    """Makes any training run an immediate failure, so a check that comes too late fails fast."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")
    monkeypatch.setattr(demo, "run_demo", refuse)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"sfoptim {sfoptim.__version__}"


@pytest.mark.parametrize("flag, value, says", [
    ("--steps", "0", "positive"),
    ("--steps", "-5", "positive"),
    ("--steps", "4", "at least 8"),
    ("--seeds", "0", "positive"),
    ("--seeds", "two", "integer"),
    ("--lrs", "0", "positive"),
    ("--lrs", "-0.01", "positive"),
    ("--lrs", "nan", "positive"),
    ("--lrs", "inf", "positive"),
    ("--weight-decays", "-1", "non-negative"),
    ("--weight-decays", "nan", "non-negative"),
    ("--threads", "0", "positive"),
])
def test_bad_values_are_refused_before_training(flag, value, says, tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as exc:
        demo.main([flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err and repr(value) in err


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_out_is_refused_before_training(where, tmp_path, capsys, no_training):
    if where == "proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc on this system")
        out = "/proc/nope"
    else:
        (tmp_path / "file").write_text("")
        out = str(tmp_path / "file" / "sub")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", out])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and out in err


def test_unknown_method_is_refused_before_training(tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--methods", "sf-adamw", "adamw-sine", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --methods" in err and "'adamw-sine'" in err and "adamw-cosine" in err


def test_method_whose_package_is_missing_is_refused_before_training(tmp_path, capsys, monkeypatch, no_training):
    # Without the optimizer's package the command says which package is
    # missing instead of failing mid-run.
    monkeypatch.setitem(sys.modules, "prodigyplus", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exc:
        demo.main(["--methods", "prodigyplus", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --methods" in err and "prodigy-plus-schedule-free" in err


def test_out_folder_is_created_and_left_clean(tmp_path, no_training):
    out = tmp_path / "a" / "b"
    with pytest.raises(AssertionError, match="training started"):
        demo.main(["--out", str(out)])
    assert out.is_dir() and list(out.iterdir()) == []  # the write test leaves nothing behind


def test_unwritable_out_exits_2_from_the_command(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _cli("demo", "--quick", "--out", str(tmp_path / "file" / "sub"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "argument --out" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_help_shows_defaults():
    proc = _cli("demo", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for flag, default in [("--steps", demo.DEFAULT.steps), ("--seeds", len(demo.DEFAULT.seeds)),
                          ("--lrs", " ".join(f"{x:g}" for x in demo.DEFAULT.lrs)),
                          ("--weight-decays", " ".join(f"{x:g}" for x in demo.DEFAULT.weight_decays)),
                          ("--threads", 1), ("--out", "sfoptim-demo")]:
        after = text.split(f"  {flag}", 1)[-1] if f"  {flag}" in text else text.split(flag)[-1]
        assert f"default: {default}" in after.split(" --")[0], (flag, after[:200])


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_is_shown_on_a_terminal(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    pytest.importorskip("mnist1d")
    master, slave = os.openpty()
    if hasattr(termios, "TIOCSWINSZ"):
        # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sfoptim.cli", "demo", "--quick", "--steps", "8", "--seeds", "1", "--methods", "sf-adamw",
             "--out", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=slave, text=True, timeout=900,
        )
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err[-2000:]
    assert "training" in err  # the bar (tqdm, or plain lines without it)
