r"""Build, cache and load the native kernel without ever loading code the user did not build.

Contract of :func:`load`:

* **Compiler**: ``$SFOPTIM_CC``, else ``$CC``, else ``gcc``, else ``cc``. The
  value is split like a shell command line (``CC="ccache gcc"`` runs ``ccache``
  with ``gcc`` as its first argument). A named compiler that cannot be found is
  an error naming the variable, never silently replaced by another compiler.
* **Cache directory**: ``$SFOPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/sfoptim``,
  else ``$HOME/.cache/sfoptim`` (the home directory from the password database
  when ``HOME`` is unset). Missing directories are created with mode 0700. The
  directory is used only if it is a real directory (not a symlink) owned by the
  current user and not writable by group or others; otherwise one warning says
  why and the library is built in a fresh private temporary directory that is
  removed after loading. With no home directory at all the library is built the
  same private way, silently.
* **File name**: ``sfoptim_fused_<key>_<sha256>.so``, where ``key`` hashes the
  source, the compiler command and its ``--version``, the flags and the CPU's
  feature flags, and ``sha256`` is the hash of the library's bytes, recorded
  when it was built.
* **Before loading**: the file is opened without following symlinks; it must be
  a regular, non-empty ELF file owned by the current user and not writable by
  group or others, and the SHA-256 of its bytes must equal the hash in its name.
  The very file descriptor that was checked is then handed to ``dlopen``
  (through ``/proc/self/fd``), so the bytes that were hashed are the bytes that
  run. A cached file that fails a check is removed and rebuilt (a truncated or
  empty file is never mapped, so it cannot crash the process); one that is not
  the user's own or is a symlink also gets a warning.
* **Building**: the compiler writes a temporary file in the cache directory,
  which is then checked and renamed into place, so concurrent processes never
  see a partial library. Temporaries older than ten minutes left by killed
  builds are removed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Loaded", "compiler_command", "cache_directory", "load"]

_PREFIX = "sfoptim_fused_"
_TMP_PREFIX = "tmp-sfoptim-"
#: Temporaries of killed builds: ours, and the ``tempfile.mkstemp`` names of earlier versions.
_STALE_TMP = re.compile(r"(tmp-sfoptim-[0-9a-f]{32}|tmp[a-z0-9_]{8})\.so")
_STALE_AFTER_S = 600
#: A kernel library is tens of kilobytes; anything far larger is not ours.
_MAX_BYTES = 64 << 20
_ELF_MAGIC = b"\x7fELF"

#: ``dlopen`` returns an already loaded library when the path string matches an
#: earlier one, so every ``/proc/self/fd/N`` name is used once per process.
_used_names: set[str] = set()


class Refused(RuntimeError):
    """A cache directory or file that must not be trusted (the message says why)."""


@dataclass
class Loaded:
    """A loaded kernel library: the handle, whether this call compiled it, and the file it was loaded from."""

    lib: ctypes.CDLL
    built: bool
    path: str


def compiler_command() -> list[str]:
    """The compiler as an argument list, from ``SFOPTIM_CC``, ``CC``, ``gcc`` or ``cc``.

    Raises ``RuntimeError`` naming the variable when a named compiler cannot be
    found, and when no compiler is found at all.
    """
    for var in ("SFOPTIM_CC", "CC"):
        value = os.environ.get(var, "")
        if not value.strip():
            continue
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise RuntimeError(f"no C compiler: {var}={value!r} cannot be parsed ({exc})") from None
        path = shutil.which(argv[0])
        if path is None:
            raise RuntimeError(f"no C compiler found: {var}={value!r} names no executable program ({argv[0]!r})")
        return [path, *argv[1:]]
    for name in ("gcc", "cc"):
        path = shutil.which(name)
        if path:
            return [path]
    raise RuntimeError("no C compiler found (set SFOPTIM_CC or install gcc)")


def _home() -> str | None:
    home = os.environ.get("HOME", "")
    if os.path.isabs(home):
        return home
    try:
        import pwd

        home = pwd.getpwuid(os.geteuid()).pw_dir
    except (ImportError, KeyError):
        return None
    return home if os.path.isabs(home) else None


def cache_directory() -> Path | None:
    """The configured cache directory, or None when there is no home to put it in."""
    explicit = os.environ.get("SFOPTIM_CACHE_DIR", "")
    if explicit:
        return Path(os.path.abspath(explicit))
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and to be ignored.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "sfoptim"
    home = _home()
    return Path(home) / ".cache" / "sfoptim" if home is not None else None


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(source: bytes, cc: list[str], flags: Sequence[str]) -> str:
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    text = ["\0".join(cc), version, " ".join(flags), platform.machine(), _cpu_identity()]
    return hashlib.sha256(b"\0".join([source, *(t.encode() for t in text)])).hexdigest()[:20]


def _untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this status must not be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by the current user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _open_directory(path: Path) -> int:
    """Create ``path`` (0700) if missing and open it; raise :class:`Refused` if it is not private."""
    missing = []
    ancestor = path
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    created = False
    for directory in reversed(missing):
        try:
            # Intermediate directories too (os.makedirs would give them the umask's mode).
            os.mkdir(directory, 0o700)
            created = True
        except FileExistsError:
            created = False  # a concurrent process made it; it is checked below like any other
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise Refused(f"the cache directory {path} is a symlink") from None
        raise
    reason = _untrusted(os.fstat(fd))
    if reason is not None:
        os.close(fd)
        raise Refused(f"the cache directory {path} is {reason}")
    if created:
        os.fchmod(fd, 0o700)  # a umask cannot leave the owner without access
    return fd


def _read_verified(dir_fd: int, name: str, expected: str | None) -> tuple[int, str]:
    """Open ``name`` in ``dir_fd`` without following symlinks and check it.

    Returns the open descriptor and the SHA-256 of its bytes. Raises
    :class:`Refused` for a file that is not the user's own, and ``ValueError``
    for one that is damaged (empty, truncated, not ELF, hash mismatch).
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"{name} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{name} is not a regular file")
        reason = _untrusted(st)
        if reason is not None:
            raise Refused(f"{name} is {reason}")
        if not 0 < st.st_size <= _MAX_BYTES:
            raise ValueError(f"{name} has {st.st_size} bytes")
        data = b""
        while len(data) < st.st_size:
            chunk = os.pread(fd, st.st_size - len(data), len(data))
            if not chunk:
                break
            data += chunk
        if len(data) != st.st_size or not data.startswith(_ELF_MAGIC):
            raise ValueError(f"{name} is not a complete shared library")
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            raise ValueError(f"{name} does not match the hash recorded when it was built")
        return fd, digest
    except BaseException:
        os.close(fd)
        raise


def _dlopen(fd: int, fallback_path: str) -> ctypes.CDLL:
    """``dlopen`` the file behind ``fd`` itself, so that the checked file is the loaded file."""
    extra: list[int] = []
    try:
        n = fd
        while f"/proc/self/fd/{n}" in _used_names:
            n = os.dup(fd)
            extra.append(n)
        name = f"/proc/self/fd/{n}"
        try:
            same = os.path.samestat(os.stat(name), os.fstat(fd))
        except OSError:
            same = False
        if not same:
            # No /proc: load by path, after checking the path still names the checked file.
            if not os.path.samestat(os.stat(fallback_path, follow_symlinks=False), os.fstat(fd)):
                raise Refused(f"{fallback_path} changed while it was being checked")
            name = fallback_path
        lib = ctypes.CDLL(name)
        _used_names.add(name)
        return lib
    finally:
        for n in extra:
            os.close(n)


def _remove_stale_temporaries(dir_fd: int) -> None:
    now = time.time()
    for name in os.listdir(dir_fd):
        if not _STALE_TMP.fullmatch(name):
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mtime < now - _STALE_AFTER_S:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass  # another process removed it first


def _load_cached(dir_fd: int, dir_path: Path, key: str, warn: Callable[[str], None]) -> Loaded | None:
    pattern = re.compile(re.escape(_PREFIX + key) + r"_([0-9a-f]{64})\.so")
    for name in sorted(os.listdir(dir_fd)):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        try:
            fd, _ = _read_verified(dir_fd, name, match.group(1))
        except FileNotFoundError:
            continue
        except (Refused, ValueError) as exc:
            if isinstance(exc, Refused):
                warn(f"{exc}; removed it from the cache in {dir_path} and rebuilt the kernel")
            # The directory is the user's own, so removing an entry touches nothing
            # of anyone else's (a symlink's target stays where it is).
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
            continue
        try:
            return Loaded(_dlopen(fd, str(dir_path / name)), built=False, path=str(dir_path / name))
        finally:
            os.close(fd)
    return None


def _build(
    dir_fd: int, dir_path: Path, key: str, cc: list[str], source: Path, flags: Sequence[str], libs: Sequence[str]
) -> Loaded:
    tmp = f"{_TMP_PREFIX}{secrets.token_hex(16)}.so"
    try:
        proc = subprocess.run(
            [*cc, *flags, str(source), "-o", str(dir_path / tmp), *libs],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cc)} failed: {proc.stderr.strip()[-2000:]}")
        try:
            # The linker creates the file with the umask's mode; the cache keeps it private.
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            fd, digest = _read_verified(dir_fd, tmp, None)
        except FileNotFoundError:
            raise RuntimeError(f"{shlex.join(cc)} exited with status 0 but wrote no library") from None
        except (Refused, ValueError, OSError) as exc:
            raise RuntimeError(f"{shlex.join(cc)} exited with status 0 but its output is unusable: {exc}") from None
        try:
            final = f"{_PREFIX}{key}_{digest}.so"
            # Atomic: a concurrent process sees the old entry or the complete new file.
            os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return Loaded(_dlopen(fd, str(dir_path / final)), built=True, path=str(dir_path / final))
        finally:
            os.close(fd)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass


def _build_privately(key: str, cc: list[str], source: Path, flags: Sequence[str], libs: Sequence[str]) -> Loaded:
    path = Path(tempfile.mkdtemp(prefix="sfoptim-build-"))  # 0700, created atomically
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return _build(dir_fd, path, key, cc, source, flags, libs)
        finally:
            os.close(dir_fd)
    finally:
        # The loaded mapping outlives the file.
        shutil.rmtree(path, ignore_errors=True)


def load(
    source: Path,
    flags: Sequence[str],
    libs: Sequence[str] = (),
    warn: Callable[[str], None] = lambda message: None,
) -> Loaded:
    """Load the library compiled from ``source`` with ``flags``, building it if needed.

    ``warn`` receives a message when the cache or a file in it is refused. Raises
    ``RuntimeError`` (or ``OSError``) when no library can be built or loaded.
    """
    cc = compiler_command()
    key = _key(source.read_bytes(), cc, [*flags, *libs])
    directory = cache_directory()
    if directory is None:
        return _build_privately(key, cc, source, flags, libs)
    try:
        dir_fd = _open_directory(directory)
    except (Refused, OSError) as exc:
        reason = str(exc) if isinstance(exc, Refused) else f"the cache directory {directory} cannot be used ({exc})"
        warn(
            f"{reason}; building the kernel in a private temporary directory instead"
            " (set SFOPTIM_CACHE_DIR to a directory that only you can write to)"
        )
        return _build_privately(key, cc, source, flags, libs)
    try:
        _remove_stale_temporaries(dir_fd)
        cached = _load_cached(dir_fd, directory, key, warn)
        return cached if cached is not None else _build(dir_fd, directory, key, cc, source, flags, libs)
    finally:
        os.close(dir_fd)
