"""The kernel cache loads only a library the user built: planted, swapped, symlinked,
truncated or empty files are refused or rebuilt before ``dlopen`` ever sees them.

A planted library here is a real shared object whose constructor writes a marker
file the moment it is loaded, so "never loaded" is observed, not inferred.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import sfoptim
from sfoptim.backends import cpu_kernel as _fused_cpu
from sfoptim.backends.abi import ABI_VERSION

COMPILER = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C compiler")
SRC = Path(sfoptim.__file__).resolve().parent.parent
OTHER_UID = 54321
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a file owned by another user needs root")

_ENV = ("SFOPTIM_CC", "CC", "SFOPTIM_CACHE_DIR", "XDG_CACHE_HOME", "SFOPTIM_DISABLE_FUSED", "SFOPTIM_TEST_MARKER")

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("SFOPTIM_TEST_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int sf_abi_version(void) { return 1; }
"""


@pytest.fixture(autouse=True)
def clean_loader(monkeypatch, tmp_path):
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("SFOPTIM_TEST_MARKER", str(marker))
    saved = (_fused_cpu._lib, _fused_cpu._failed, set(_fused_cpu._warned))
    _fused_cpu._reset_for_tests()
    yield marker
    _fused_cpu._lib, _fused_cpu._failed = saved[0], saved[1]
    _fused_cpu._warned.clear()
    _fused_cpu._warned.update(saved[2])


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """The file name (as the code under test names it) and bytes of a real build."""
    cache = tmp_path_factory.mktemp("genuine")
    with pytest.MonkeyPatch.context() as mp:
        for var in _ENV:
            mp.delenv(var, raising=False)
        mp.setenv("SFOPTIM_CACHE_DIR", str(cache))
        saved = (_fused_cpu._lib, _fused_cpu._failed)
        _fused_cpu._reset_for_tests()
        assert _fused_cpu.available()
        _fused_cpu._lib, _fused_cpu._failed = saved
    (path,) = cache.glob("*.so")
    return path.name, path.read_bytes()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A shared library that leaves a marker file when anything loads it."""
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(PLANTED_C)
    subprocess.run([COMPILER, "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")], check=True)
    return (d / "planted.so").read_bytes()


def _load() -> tuple[bool, list[str]]:
    """Load the kernel as a fresh process would; the warnings it gives."""
    _fused_cpu._reset_for_tests()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = _fused_cpu.available()
    return ok, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _assert_kernel_matches_foreach() -> None:
    init = torch.randn(300, dtype=torch.float64)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [sfoptim.AdamWScheduleFree([params[0]], fused=True), sfoptim.AdamWScheduleFree([params[1]], fused=False)]
    for step in range(3):
        for p, opt in zip(params, opts, strict=True):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
    torch.testing.assert_close(params[0].detach(), params[1].detach(), rtol=1e-12, atol=1e-12)


def _run_fresh_process(env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        """
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from sfoptim.backends import cpu_kernel as _fused_cpu
            ok = _fused_cpu.available()
        print(json.dumps({"available": ok, "built": _fused_cpu.build_count,
                          "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    env.update(env_updates, PYTHONPATH=str(SRC))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)
    return path


def _plant(path: Path, data: bytes, mode: int = 0o644, uid: int | None = None) -> None:
    path.write_bytes(data)
    path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, uid)


def _is_verified_build(path: Path) -> bool:
    data = path.read_bytes()
    return not path.is_symlink() and hashlib.sha256(data).hexdigest() in path.name


# ---------------------------------------------------------------- planted code
SHARED_CASES = {
    "world-writable directory": dict(dir_mode=0o777, dir_uid=None, lib_mode=0o644, lib_uid=None),
    "directory of another user": dict(dir_mode=0o755, dir_uid=OTHER_UID, lib_mode=0o644, lib_uid=OTHER_UID),
    "library of another user": dict(dir_mode=0o700, dir_uid=None, lib_mode=0o644, lib_uid=OTHER_UID),
    "group-writable library": dict(dir_mode=0o700, dir_uid=None, lib_mode=0o664, lib_uid=None),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(name, marks=as_root if (c["dir_uid"] or c["lib_uid"]) else ())
        for name, c in SHARED_CASES.items()
    ],
)
def test_planted_library_in_shared_cache_never_runs(case, genuine, planted, clean_loader, tmp_path, monkeypatch):
    c = SHARED_CASES[case]
    shared = tmp_path / "shared-xdg"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    cache = shared / "sfoptim"
    cache.mkdir()
    name, _ = genuine
    _plant(cache / name, planted, c["lib_mode"], c["lib_uid"])
    cache.chmod(c["dir_mode"])
    if c["dir_uid"] is not None:
        os.chown(cache, c["dir_uid"], c["dir_uid"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))

    ok, messages = _load()

    assert not clean_loader.exists(), "the planted library was loaded"
    assert ok, messages
    assert len(messages) == 1 and str(cache) in messages[0], messages
    _assert_kernel_matches_foreach()


def test_library_swapped_after_build_is_rebuilt_not_loaded(planted, clean_loader, tmp_path, monkeypatch):
    cache = _private_dir(tmp_path / "cache")
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))
    ok, _ = _load()
    assert ok
    (lib,) = cache.glob("*.so")
    # Same name, owner and mode: only the content changed. Swapped by rename, as
    # an editor or a build tool would: writing into the file in place would
    # change pages this process has mapped, and the process would die of
    # SIGBUS at exit (a property of the test, not of the loader).
    swapped = lib.with_name("swapped.tmp")
    swapped.write_bytes(planted)
    os.chmod(swapped, lib.stat().st_mode & 0o777)
    os.replace(swapped, lib)

    # A fresh process: within this one, dlopen would hand back the library already loaded.
    proc = _run_fresh_process({"SFOPTIM_CACHE_DIR": str(cache), "SFOPTIM_TEST_MARKER": str(clean_loader)})

    assert proc.returncode == 0, proc.stderr
    assert not clean_loader.exists(), "the swapped library was loaded"
    result = json.loads(proc.stdout)
    assert result["available"] and result["built"] == 1, result
    (lib,) = cache.glob("*.so")
    assert _is_verified_build(lib)


def test_symlinked_library_is_not_followed(genuine, planted, clean_loader, tmp_path, monkeypatch):
    cache = _private_dir(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere.so"
    _plant(elsewhere, planted, 0o600)
    name, _ = genuine
    (cache / name).symlink_to(elsewhere)
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))

    ok, messages = _load()

    assert not clean_loader.exists(), "the library behind the symlink was loaded"
    assert ok
    assert len(messages) == 1 and "symlink" in messages[0], messages
    assert elsewhere.read_bytes() == planted  # the symlink's target is left alone
    (lib,) = cache.glob("*.so")
    assert _is_verified_build(lib)
    _assert_kernel_matches_foreach()


def test_symlinked_cache_directory_is_refused(genuine, planted, clean_loader, tmp_path, monkeypatch):
    foreign = tmp_path / "someone-elses-cache"
    foreign.mkdir()
    name, _ = genuine
    _plant(foreign / name, planted, 0o644)
    if os.geteuid() == 0:
        os.chown(foreign / name, OTHER_UID, OTHER_UID)
        os.chown(foreign, OTHER_UID, OTHER_UID)
    link = tmp_path / "my-cache"
    link.symlink_to(foreign)
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(link))

    ok, messages = _load()

    assert not clean_loader.exists(), "the library behind the symlinked directory was loaded"
    assert ok
    assert len(messages) == 1 and "symlink" in messages[0], messages
    assert sorted(p.name for p in foreign.iterdir()) == [name]  # nothing written there
    _assert_kernel_matches_foreach()


# ------------------------------------------------------------ damaged libraries
def test_truncated_library_is_rebuilt_without_crashing(genuine, tmp_path):
    cache = _private_dir(tmp_path / "cache")
    name, data = genuine
    _plant(cache / name, data[:20_000], 0o600)

    proc = _run_fresh_process({"SFOPTIM_CACHE_DIR": str(cache)})

    assert proc.returncode == 0, f"the process died (status {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout)
    assert result["available"] and result["built"] == 1, result
    (lib,) = cache.glob("*.so")
    assert _is_verified_build(lib)


def test_compiler_that_writes_nothing_does_not_disable_the_kernel_for_good(tmp_path, monkeypatch):
    broken = tmp_path / "broken-now"
    broken.touch()
    cc = tmp_path / "flaky-cc"
    # Identifies itself as the real compiler (same cache key), but while the flag
    # file exists it "compiles" by exiting 0 without writing anything.
    cc.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            for a in "$@"; do [ "$a" = --version ] && exec {COMPILER} "$@"; done
            [ -e {broken} ] && exit 0
            exec {COMPILER} "$@"
            """
        )
    )
    cc.chmod(0o755)
    cache = _private_dir(tmp_path / "cache")
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))
    monkeypatch.setenv("SFOPTIM_CC", str(cc))

    ok, messages = _load()
    assert not ok
    assert len(messages) == 1 and "wrote no library" in messages[0], messages
    assert list(cache.glob("*.so")) == []

    broken.unlink()
    builds = _fused_cpu.build_count
    ok, messages = _load()
    assert ok, messages
    assert _fused_cpu.build_count == builds + 1
    (lib,) = cache.glob("*.so")
    assert _is_verified_build(lib)


def test_stale_build_temporaries_are_removed(tmp_path, monkeypatch):
    cache = _private_dir(tmp_path / "cache")
    hour_ago = time.time() - 3600
    stale = ["tmpab12_x9z.so", "tmp-sfoptim-" + "0" * 32 + ".so"]
    kept = {
        "tmp-sfoptim-" + "1" * 32 + ".so": time.time(),  # a build running right now
        "notes.so": hour_ago,  # not ours
        "tmpab12_x9z.txt": hour_ago,
    }
    for name in stale:
        _plant(cache / name, b"", 0o600)
        os.utime(cache / name, (hour_ago, hour_ago))
    for name, when in kept.items():
        _plant(cache / name, b"", 0o600)
        os.utime(cache / name, (when, when))
    if os.geteuid() == 0:
        foreign = "tmpforeign1.so"
        _plant(cache / foreign, b"", 0o600, OTHER_UID)
        os.utime(cache / foreign, (hour_ago, hour_ago))
        kept[foreign] = hour_ago
    os.utime(cache, (hour_ago, hour_ago))  # nothing has happened in the directory since
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))

    ok, _ = _load()

    assert ok
    left = {p.name for p in cache.iterdir()}
    assert not left & set(stale)
    assert set(kept) <= left


# ------------------------------------------------- directory and compiler choice
def test_cache_directories_are_created_private(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "b" / "sfoptim"
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))
    old = os.umask(0o002)
    try:
        ok, messages = _load()
    finally:
        os.umask(old)
    assert ok, messages
    for d in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert d.stat().st_mode & 0o777 == 0o700, d
    (lib,) = cache.glob("*.so")
    assert lib.stat().st_mode & 0o077 == 0


def test_no_home_directory_builds_privately_and_writes_nothing_in_cwd(tmp_path, monkeypatch):
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))

    ok, messages = _load()

    assert ok, messages
    assert list(cwd.iterdir()) == []  # no ./~/.cache/sfoptim
    assert list(private_tmp.iterdir()) == []  # the private build directory is gone
    _assert_kernel_matches_foreach()


def test_compiler_with_arguments_is_used(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ccache.log"
    wrapper = bin_dir / "ccache"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("CC", f"ccache {Path(COMPILER).name}")
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(_private_dir(tmp_path / "cache")))

    ok, messages = _load()

    assert ok, messages
    calls = log.read_text().splitlines() if log.exists() else []
    assert any("-O3" in call and call.startswith(Path(COMPILER).name) for call in calls), calls
    _assert_kernel_matches_foreach()


def test_named_compiler_that_does_not_exist_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "sfoptim-no-such-compiler -O2")
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(_private_dir(tmp_path / "cache")))

    ok, messages = _load()

    assert not ok
    assert len(messages) == 1 and "CC='sfoptim-no-such-compiler -O2'" in messages[0], messages


def test_concurrent_first_builds_share_one_library(tmp_path, monkeypatch):
    # Threads race through the same filesystem steps (compile, check, rename,
    # clean up) as processes do, without paying for a Python start-up each.
    from sfoptim.backends import kernel_cache as _kernel_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))
    barrier = threading.Barrier(4)
    results: list[object] = []

    def build() -> None:
        barrier.wait()
        try:
            loaded = _kernel_cache.load(_fused_cpu._SOURCE, _fused_cpu._FLAGS, _fused_cpu._LIBS)
            results.append(loaded.lib.sf_abi_version())
        except Exception as exc:  # reported below with the others
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [ABI_VERSION] * 4
    (lib,) = cache.glob("*.so")
    assert _is_verified_build(lib)
    assert [p.name for p in cache.iterdir() if p.name.startswith("tmp")] == []


def test_an_edited_kernel_source_gets_its_own_cache_entry(tmp_path, monkeypatch):
    """The cache key covers the C source: a library built from other source bytes is never reused.

    A copy with the same bytes finds the cached library; a copy with one
    comment added is built anew under another key (an upgrade that changes the
    kernel must not load the previous version's library from the cache).
    """
    from sfoptim.backends import kernel_cache as _kernel_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("SFOPTIM_CACHE_DIR", str(cache))
    source = _fused_cpu._SOURCE.read_bytes()
    same, edited = tmp_path / "same" / "cpu_kernel.c", tmp_path / "edited" / "cpu_kernel.c"
    for path, text in ((same, source), (edited, source + b"/* edited */\n")):
        path.parent.mkdir()
        path.write_bytes(text)

    def load(path: Path) -> tuple[bool, str]:
        loaded = _kernel_cache.load(path, _fused_cpu._FLAGS, _fused_cpu._LIBS)
        assert loaded.lib.sf_abi_version() == ABI_VERSION
        return loaded.built, Path(loaded.path).name

    built, original = load(_fused_cpu._SOURCE)
    assert built
    assert load(same) == (False, original)
    built, changed = load(edited)
    assert built, "a library built from other source bytes was taken from the cache"
    key_of = lambda name: name.removeprefix("sfoptim_fused_").split("_")[0]  # noqa: E731
    assert key_of(changed) != key_of(original)
    assert load(edited) == (False, changed)
    assert sorted(p.name for p in cache.glob("*.so")) == sorted([original, changed])
