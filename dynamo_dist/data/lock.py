"""Who may write a directory: an exclusive lock for the stage that writes it, shared ones for readers.

A population root is written by ``population``, ``add-models`` and ``repair`` and read by
``meta``, ``sweep``, ``analyze`` and ``embed``; a meta output directory is written by
``meta`` and ``analyze``. Each of those holds a lock on the directory for as long as it
runs, so a second writer (or a reader of a half-written population) is refused at once
with a message naming the holder, instead of two processes training the same models and
rewriting one manifest.

The lock is ``flock(2)`` on ``<dir>/.dynamo.lock``: the kernel releases it when its
process exits however it exits (SIGKILL included), so there is no stale lock to clear by
hand. The file also records the last exclusive holder (pid, host, command, start time) for
the refusal message; it stays in place between runs (removing it would let two waiters
lock two different files). Ray actors and Train workers write under the lock their driver
holds. On a shared filesystem ``flock`` is honoured by NFSv4 and most cluster filesystems.

On an object store (a URI root) there is no flock: the writer puts a lease object
``<dir>/.dynamo.lock`` naming itself and renews it every ``LEASE_RENEW_S`` seconds; a writer or
reader that finds a lease renewed within ``LEASE_TTL_S`` is refused, naming the holder; a lease
left by a killed writer expires by itself. Object stores give no compare-and-swap through
pyarrow, so two writers starting within one round trip of each other can both take it: the
lease catches the common mistake (a second run on the same bucket prefix), not a race.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
import threading
from pathlib import Path

from . import fsio

LOCK_FILE = ".dynamo.lock"
LEASE_TTL_S = 90.0
LEASE_RENEW_S = 20.0

_held: dict[str, list] = {}  # lock path -> [fd, shared, depth]: a process re-entering its own lock


class LockedError(ValueError):
    """Another process holds the directory (a ValueError: the CLI reports it, exit 2)."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        info = {}  # a writer killed before it could clear its record: the holder now is a reader
    if not info:
        return "another dynamo-dist process that reads it (meta, sweep, analyze or embed)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return (f"{info.get('stage', 'a stage')} (pid {info.get('pid')} on {info.get('host')}, since {since}: "
            f"{info.get('command', '?')})")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def hold(directory: str | os.PathLike, stage: str, *, shared: bool = False, what: str = "directory"):
    """Hold ``directory`` for ``stage`` (exclusive; ``shared=True`` for a reader) while the block runs.

    Raises :class:`LockedError` naming the holder when another process holds it in a conflicting
    mode. The directory is created for an exclusive lock; a reader of a directory that does not
    exist, or that it cannot write (a read-only mount), proceeds without a lock, since no writer
    can be there through it.
    """
    if fsio.is_uri(directory):
        with _hold_lease(fsio.as_path(directory), stage, shared=shared, what=what):
            yield
        return
    d = Path(directory)
    if shared and not d.is_dir():
        yield  # nothing to read there: the reader's own checks say so, in their terms
        return
    if not shared:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            in_way = "; a file is in the way" if d.exists() or err.errno == errno.ENOTDIR else ""
            raise ValueError(f"{what} {d} is not writable: cannot create it ({err.strerror}{in_way})") from None
    path = d / LOCK_FILE
    key = str(path.resolve()) if d.exists() else str(path)
    mine = _held.get(key)
    if mine is not None:  # this process already holds it (a pipeline's stage inside another)
        if mine[1] and not shared:
            _flock(mine[0], path, shared=False, what=what, d=d)
            mine[1] = False
        with _nested(mine):
            yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if shared and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield  # a read-only population: nobody can write it through this mount
            return
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(f"{what} not found: {d}") from None
        raise ValueError(f"{what} {d} is not writable: {err.strerror}") from None
    try:
        _flock(fd, path, shared=shared, what=what, d=d)
        if not shared:
            info = _holder_info(stage)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = [fd, shared, 1]
        try:
            yield
        finally:
            del _held[key]
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def _nested(mine: list):
    """Another hold of a lock this process holds already: counted, released with the outermost one."""
    mine[2] += 1
    try:
        yield
    finally:
        mine[2] -= 1


def _holder_info(stage: str) -> dict:
    return {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}


@contextmanager
def _hold_lease(d: fsio.RemotePath, stage: str, *, shared: bool, what: str):
    path = d / LOCK_FILE
    key = str(path)
    mine = _held.get(key)
    if mine is not None:  # a pipeline's stage inside another, in this process
        with _nested(mine):
            yield
        return
    try:
        lease = json.loads(path.read_bytes() or b"{}") if path.is_file() else {}
    except (OSError, ValueError):
        lease = {}
    if lease and time.time() - float(lease.get("renewed", 0)) < LEASE_TTL_S:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("since", 0)))
        raise LockedError(f"{what} {d} is in use by {lease.get('stage', 'a stage')} (pid {lease.get('pid')} on "
                          f"{lease.get('host')}, since {since}: {lease.get('command', '?')}); wait for it to finish "
                          f"or stop it (its lease, {path}, expires {LEASE_TTL_S:.0f} s after that process stops)")
    if shared:
        yield  # readers take no lease: they only refuse to read what a live writer is writing
        return
    fsio.check_writable(d, what)
    info = _holder_info(stage)
    stop = threading.Event()

    def put() -> None:
        path.write_bytes(json.dumps({**info, "renewed": time.time()}).encode())

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                put()
            except OSError:
                pass  # one missed renewal; the lease lives LEASE_TTL_S, the next try is in LEASE_RENEW_S

    put()
    thread = threading.Thread(target=renew, daemon=True, name="dynamo-lease")
    thread.start()
    _held[key] = [None, False, 1]
    try:
        yield
    finally:
        del _held[key]
        stop.set()
        thread.join(timeout=30)
        path.unlink(missing_ok=True)


def _flock(fd: int, path: Path, *, shared: bool, what: str, d: Path) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(f"{what} {d} is in use by {_holder_text(path)}; wait for it to finish or stop it "
                          f"(the lock, {path}, is freed when that process exits)") from None


__all__ = ["hold", "LockedError", "LOCK_FILE"]
