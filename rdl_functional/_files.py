"""Writing files whole or not at all, durably, and checking a path before any work is spent on it.

Every file the library writes (``rf.save``, checkpoints, plots, ``--json``)
goes through :func:`atomic_write`:

- the data goes to a temporary file beside the target, which is flushed to
  disk (``fsync``) and renamed over the target, and the folder is flushed
  too: a reader, or a machine that loses power, sees the old file or the new
  one, never a part;
- the temporary file is removed if the write fails, if a catchable signal
  (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, ...) arrives during it, and, for one left by
  an uncatchable SIGKILL, by the next write to the same path; a writer holds a lock
  (``flock``) on its temporary file until it is renamed, and only a temporary file whose
  lock can be taken (its writer is gone) is removed, so two writers to one path (two runs
  on one checkpoint) both finish, the last rename winning;
- a write that fails (a full disk, a file-size limit, a folder deleted meanwhile) raises an
  ``OSError`` that names the file, and the file as it was is kept;
- an existing file keeps its mode; a new one gets the mode ``open()`` would
  give it; a symlink is written through, to its target;
- the temporary name is short, so any name the file system accepts works.

:func:`check_writable` says what is wrong with a path before anything runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: a file open for writing cannot be removed there anyway
    fcntl = None  # type: ignore[assignment]

# The catchable signals whose default is to end the process (SIGPIPE aside, which Python ignores).
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                                    "SIGALRM", "SIGXCPU", "SIGXFSZ") if hasattr(signal, name))
_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    """``.rdl-<12 hex digits of the name's hash>.``: short, and the same for every write to one path."""
    return f".rdl-{hashlib.sha256(target.name.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}."


def resolve(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces: a symlink's target (followed to the end), else ``path`` itself."""
    target = Path(path)
    if target.is_symlink():
        return Path(os.path.realpath(target))
    return target


def check_writable(path: str | os.PathLike[str], who: str) -> Path:
    """Raise ``OSError`` (naming ``path``) unless a file can be written there; return where it will be written.

    Checked: the path is not a folder nor a symlink loop, its folder exists
    and is writable, and its name is not longer than the file system allows.
    """
    given = Path(path)
    shown = f"{who}: {str(given)!r}"
    _check_name_length(given, shown)  # first: a name too long makes every other question fail
    _check_not_a_loop(given, shown)
    target = resolve(given)
    if target.is_dir():
        raise IsADirectoryError(f"{shown} is a folder; expected a file path")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{shown}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{shown}: the folder {str(folder)!r} is not writable")
    # Permission bits do not tell everything (a read-only mount, /proc, a full quota, root): try.
    probe = folder / f"{_temp_prefix(target)}probe{secrets.token_hex(4)}{_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise OSError(f"{shown}: cannot create a file in {str(folder)!r}: {error.strerror}") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)
    _check_name_length(target, shown)
    if target.exists() and not target.is_file():
        raise OSError(f"{shown} exists and is not a regular file")
    return target


def _check_not_a_loop(given: Path, shown: str) -> None:
    """A symlink that leads back to itself reads as "no file" everywhere (``exists()`` is false): refuse it, or
    the write would replace the link with a file."""
    try:
        os.stat(given)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{shown} is a symlink loop (a link that leads back to itself); point it "
                          "at a file, or remove it") from None


def _check_name_length(target: Path, shown: str) -> None:
    try:
        limit = os.pathconf(target.parent if target.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(target.name)) > limit:
        raise OSError(f"{shown}: the name is {len(os.fsencode(target.name))} bytes long; this file system "
                      f"allows {limit}")


def _remove_stale(target: Path) -> None:
    """Remove the temporary files that earlier writes to ``target`` left (a SIGKILL cannot be caught): those whose
    lock can be taken, as no live writer holds it; another writer's file in flight is left alone."""
    prefix = _temp_prefix(target)
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(prefix) and entry.name.endswith(_SUFFIX):
                with contextlib.suppress(OSError):
                    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    try:
                        if _try_lock(fd):
                            os.unlink(entry.path)
                    finally:
                        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd``'s file without waiting; ``False`` when another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (ENOLCK, EOPNOTSUPP): writes go on, unguarded as before
        return True
    return True


def _locked_temporary(target: Path, temporary: list[str]) -> int:
    """Create a temporary file beside ``target`` and lock it; return its descriptor, held open (and the lock with
    it) until the file is renamed. Its name goes into ``temporary`` before it exists, so that a signal at any
    moment finds it."""
    while True:
        tmp = str(target.parent / f"{_temp_prefix(target)}{secrets.token_hex(4)}{_SUFFIX}")
        temporary[:] = [tmp]
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:  # another writer's name: never ours to remove
            temporary.clear()
            continue
        if not _try_lock(fd):  # a new file: only another writer's cleanup can hold its lock, and it removes it
            os.close(fd)
            continue
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by another writer's cleanup before the lock was taken: another name


@contextlib.contextmanager
def _removed_on_signal(temporary: list[str]) -> Iterator[None]:
    """While the block runs, a catchable signal first removes the file named in ``temporary``, then does what
    it did before (raise KeyboardInterrupt, end the process, ...). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: object) -> None:
        for name in temporary:
            with contextlib.suppress(OSError):
                os.unlink(name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # what the signal would have done: end the process

    for signum in _SIGNALS:
        # Only where the signal would end the process at once: an ignored signal changes nothing, and a Python
        # handler either returns (the write goes on) or raises (the write's own cleanup removes the file).
        with contextlib.suppress(OSError, ValueError, TypeError):
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(signum, before)


def _fsync(path: Path | str, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems cannot sync a folder; the file itself must be synced
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *, who: str = "write") -> None:
    """Call ``write(temporary_path)`` beside ``path``, then flush it to disk and rename it to ``path``.

    A reader sees the old file or the new one, never a part; if ``write``
    fails or a catchable signal arrives, the temporary file is removed and
    ``path`` is untouched (see the module's doc for the rest).

    Raises:
        OSError: from :func:`check_writable`, or the write failed (a full disk, a file-size limit, the folder
            deleted): of the same class and errno, its message naming ``path``.
    """
    target = check_writable(path, who)
    _remove_stale(target)
    if target.exists():
        mode = stat.S_IMODE(target.stat().st_mode)
    else:
        mode = 0o666 & ~_umask()
    temporary: list[str] = []
    with _removed_on_signal(temporary):
        fd = -1
        try:
            fd = _locked_temporary(target, temporary)
            tmp = temporary[0]
            write(tmp)
            os.chmod(tmp, mode)
            _fsync(tmp)
            os.replace(tmp, target)
        except BaseException as error:
            for name in temporary:
                with contextlib.suppress(OSError):
                    os.unlink(name)
            if isinstance(error, OSError):
                raise _naming(error, target, who) from None
            raise
        finally:
            if fd >= 0:
                os.close(fd)  # and the lock with it, once the file has its name (or is gone)
        _fsync(target.parent, folder=True)


def _naming(error: OSError, target: Path, who: str) -> OSError:
    """``error`` (of the same class, errno kept) with a message that names the file and says it is kept."""
    kept = "the file there is left as it was" if target.exists() else "nothing was written"
    message = f"{who}: cannot write {str(target)!r}: {error.strerror or error}; {kept}"
    try:
        named = type(error)(message)
    except TypeError:  # a subclass that takes other arguments
        named = OSError(message)
    named.errno = error.errno
    return named
