"""Local paths and object-store URIs behind one path type: what lets every stage read and write a bucket.

``as_path(p)`` returns a ``pathlib.Path`` for a local path and a :class:`RemotePath` for a URI
``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``, ...). ``RemotePath`` has the
part of ``Path``'s interface the stages use (``/``, ``parent``, ``name``, ``exists``,
``is_file``, ``read_bytes``, ``write_bytes``, ``glob``, ...), so code that handles a population
root or a meta output directory handles both. An S3-compatible endpoint comes from the usual
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile),
as pyarrow and boto read it.

Atomicity for readers: a local write goes to a temporary name and is renamed into place; a remote
write is one put of the finished object (``write_bytes``), which an object store makes visible
whole or not at all, so a crashed writer never leaves a partial object under a reader's name.

Stages that write many files with libraries that want a local path (matplotlib, torch.save)
write into :func:`staged` directories, uploaded file by file when the block ends without error.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import signal
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

BUCKET_SCHEMES = ("s3", "gs", "gcs")  # the URI's host is a bucket, part of the filesystem path
# The URI schemes a path may have (file:// is a local path). Object stores map bucket/key as above;
# hdfs/viewfs map host + /path. Not abfs/abfss: pyarrow's AzureFileSystem names a container as
# ``container@account`` and wants ``container/path`` inside it, a mapping nothing here makes or
# tests (each abfs:// root failed with "Location cannot start with a separator").
URI_SCHEMES = BUCKET_SCHEMES + ("hdfs", "viewfs")
_filesystems: dict[tuple[str, str], pafs.FileSystem] = {}
_fs_lock = threading.Lock()


def is_uri(p: str | os.PathLike | "RemotePath") -> bool:
    """True for a URI with a scheme other than ``file`` (``s3://b/k``); local paths and ``file://`` are False."""
    if isinstance(p, RemotePath):
        return True
    s = os.fspath(p) if not isinstance(p, str) else p
    return "://" in s and not s.startswith("file://")


_CONNECTION_ENV = ("AWS_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR_HOST", "HADOOP_", "ARROW_")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI; one filesystem object per scheme and bucket
    (and per endpoint and credentials in the environment: a process that points AWS_ENDPOINT_URL or
    its keys elsewhere gets a filesystem for them, not the one made for the old ones).

    A scheme pyarrow does not know, or one this module cannot map (``URI_SCHEMES``), is a ValueError
    naming the URI and the supported schemes.
    """
    scheme, _, rest = uri.partition("://")
    if scheme not in URI_SCHEMES:
        raise ValueError(f"{uri}: dynamo_dist cannot store files at a {scheme}:// URI; give a local path or a URI "
                         f"with one of the supported schemes {', '.join(s + '://' for s in URI_SCHEMES)}")
    bucket = rest.split("/", 1)[0]
    key = (scheme, bucket, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CONNECTION_ENV))))
    with _fs_lock:
        fs = _filesystems.get(key)
    if fs is None:
        try:
            fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"{uri}: pyarrow.fs has no filesystem for the scheme {scheme!r} ({err}); give a local "
                             "path or a URI such as s3://bucket/prefix, gs://bucket/prefix or hdfs://host/path") from None
        except OSError as err:
            raise ValueError(f"{uri}: cannot open its filesystem ({err})") from None
        with _fs_lock:
            fs = _filesystems.setdefault(key, fs)
    if scheme in BUCKET_SCHEMES:  # object stores: the bucket is the first part of the path
        return fs, f"{bucket}/{rest.split('/', 1)[1]}".rstrip("/") if "/" in rest else bucket
    return fs, "/" + rest.split("/", 1)[1].rstrip("/") if "/" in rest else "/"  # hdfs://host:port/path -> /path


class RemotePath:
    """A file or directory on a ``pyarrow.fs`` filesystem, named by its URI (``str()`` gives the URI)."""

    def __init__(self, uri: str):
        scheme, _, rest = str(uri).partition("://")
        rest = posixpath.normpath("/" + rest)[1:]  # collapse '//', '/./' and 'a/..', drop a trailing '/'
        self.uri = f"{scheme}://{rest}"
        self.scheme = scheme

    # ---------------------------------------------------------------- naming

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        return RemotePath(f"{self.uri}/{os.fspath(part)}")

    @property
    def _rest(self) -> str:
        return self.uri.partition("://")[2]

    @property
    def name(self) -> str:
        return PurePosixPath(self._rest).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self._rest).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self._rest).suffix

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{PurePosixPath(self._rest).parent}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return PurePosixPath(self._rest).relative_to(PurePosixPath(other._rest))

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.uri)[0]

    @property
    def fs_path(self) -> str:
        return filesystem(self.uri)[1]

    # ---------------------------------------------------------------- queries

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.fs_path)
        except OSError as err:
            raise store_error(self.uri, "read", err) from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"not found: {self.uri}")
        return SimpleNamespace(st_size=info.size or 0, st_mtime=info.mtime.timestamp() if info.mtime else 0.0)

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        if not self.is_dir():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.fs_path, recursive=recursive, allow_not_found=True))

    def _from_fs_path(self, fs_path: str) -> RemotePath:
        if self.scheme in BUCKET_SCHEMES:
            return RemotePath(f"{self.scheme}://{fs_path}")
        return RemotePath(f"{self.scheme}://{self._rest.split('/', 1)[0]}{fs_path}")  # the host stays in the URI

    def iterdir(self) -> Iterator[RemotePath]:
        for info in self._children(False):
            yield self._from_fs_path(info.path)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Children (``*.parquet``) or, with ``**/``, descendants matching the pattern's last part."""
        recursive = pattern.startswith("**/")
        last = pattern[3:] if recursive else pattern
        if "/" in last:
            raise ValueError(f"RemotePath.glob supports 'NAME' and '**/NAME' patterns, not {pattern!r}")
        for info in sorted(self._children(recursive), key=lambda i: i.path):
            if fnmatch.fnmatch(PurePosixPath(info.path).name, last):
                yield self._from_fs_path(info.path)

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        return self.glob(f"**/{pattern}")

    def files(self) -> list[RemotePath]:
        """Every file under this directory, from one listing (no request per entry)."""
        return [self._from_fs_path(i.path) for i in sorted(self._children(True), key=lambda i: i.path)
                if i.type == pafs.FileType.File]

    # ---------------------------------------------------------------- reads and writes

    def open_input(self) -> pa.NativeFile:
        return self.fs.open_input_file(self.fs_path)

    def read_bytes(self) -> bytes:
        try:
            with self.open_input() as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"not found: {self.uri}") from None
        except OSError as err:
            raise store_error(self.uri, "read", err) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One put of the whole object: readers see the old object or the new one, never a part.

        An output stream closed by an exception puts what it holds so far, so a Ctrl-C landing between
        the open and the write would put an empty object: the put runs with interrupts deferred."""
        try:
            with interrupts_deferred(), self.fs.open_output_stream(self.fs_path) as f:
                f.write(data)
        except OSError as err:
            raise store_error(self.uri, "write", err) from None

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Object stores have no directories (a marker object would only clutter listings); on filesystems
        that do (HDFS), create it."""
        if self.scheme not in BUCKET_SCHEMES:
            self.fs.create_dir(self.fs_path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        self.fs.delete_dir(self.fs_path)


AnyPath = Path | RemotePath
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM that arrive in the block and deliver them, to the handlers they would
    have reached, when it ends. Python runs signal handlers in the main thread only, so elsewhere
    (and for signals whose handler Python does not own, or ignores) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    previous = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue
        previous[sig] = handler
        signal.signal(sig, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)  # default_int_handler: KeyboardInterrupt, here
            else:  # SIG_DFL: what the signal does by default (SIGTERM ends the process)
                signal.raise_signal(signum)
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "credentials")


def store_error(uri: str, action: str, err: OSError) -> OSError:
    """An object-store error that names the URI, and the credentials when the store refused them
    or none were found."""
    hint = ("; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; for gs://, "
            "GOOGLE_APPLICATION_CREDENTIALS)") if any(d in str(err) for d in _DENIED) else ""
    hint = _no_credentials(uri) or hint
    out = OSError(f"cannot {action} {uri}: {_first_line(err)}{hint}")
    out.strerror = str(out)
    return out


_AWS_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _no_credentials(uri: str) -> str:
    """For an s3:// URI and a process with no AWS credentials anywhere the AWS SDK looks (the
    environment, ~/.aws, web identity, container), the sentence that says so; else "". A store
    asked without credentials answers with errors that do not say it (moto: "AWS Error UNKNOWN
    (HTTP status 500)"), so a failed request is explained here. Only an EC2 instance role is not
    looked for (that needs the network)."""
    if not str(uri).startswith("s3://") or any(os.environ.get(k) for k in _AWS_SOURCES):
        return ""
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return ""
    return ("; no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with "
            "~/.aws/credentials (an EC2 instance role is the only source not looked for)")


def as_path(p: str | os.PathLike | RemotePath) -> AnyPath:
    """A ``RemotePath`` for a URI, else a local ``Path`` (``~`` expanded, ``file://`` stripped)."""
    if isinstance(p, (Path, RemotePath)):
        return p
    s = os.fspath(p)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return RemotePath(s) if is_uri(s) else Path(s).expanduser()


def absolute(p: str | os.PathLike | RemotePath) -> str:
    """A path as every process sees it (Ray workers run in other directories): a URI as it is, a local
    path absolute with ``~`` expanded."""
    path = as_path(p)
    return str(path) if isinstance(path, RemotePath) else str(path.resolve())


def relative(target: str, start: str) -> str | None:
    """``target`` relative to ``start`` (both as ``absolute`` gives them), None when no relative path
    joins them (other schemes or buckets)."""
    if is_uri(target) or is_uri(start):
        (ts, _, tr), (ss, _, sr) = target.partition("://"), start.partition("://")
        if ts != ss or tr.split("/", 1)[0] != sr.split("/", 1)[0]:
            return None
        return posixpath.relpath("/" + tr, "/" + sr)
    return os.path.relpath(target, start)


def open_input(path: AnyPath) -> pa.NativeFile:
    """One open handle for reading (a local rename between two opens cannot mix two files)."""
    return path.open_input() if isinstance(path, RemotePath) else pa.OSFile(str(path))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` into file ``fd`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_bytes_atomic(path: AnyPath, data: bytes) -> None:
    """Write a whole file so no reader sees part of it: a put remotely, temp-and-rename locally."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ray_storage_kwargs(path: str | os.PathLike | RemotePath) -> dict:
    """``storage_path`` (+ ``storage_filesystem`` for a URI: the same pyarrow filesystem every stage uses)
    of a Ray Train or Tune ``RunConfig`` storing its checkpoints and results in ``path``."""
    where = as_path(path)
    if isinstance(where, RemotePath):
        return {"storage_path": where.fs_path, "storage_filesystem": where.fs}
    return {"storage_path": str(where)}


def check_writable(path: AnyPath, what: str) -> None:
    """Refuse a directory that cannot be written, before any work: a missing bucket, credentials the
    store rejects, a read-only mount. A probe object is written and deleted."""
    if not isinstance(path, RemotePath):
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"{what} {path} is not writable: {err}") from None
        return
    bucket = path.fs_path.split("/", 1)[0]
    try:
        found = path.fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as err:
        missing = _no_credentials(str(path))
        raise ValueError(f"{what} {path}: cannot reach its store ({_first_line(err)})" + (missing or
                         "; check the endpoint (AWS_ENDPOINT_URL) and credentials (AWS_ACCESS_KEY_ID/"
                         "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")) from None
    if not found:
        raise ValueError(f"{what} {path}: the bucket {bucket!r} does not exist (or these credentials cannot see "
                         "it); create it first or give another URI")
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable: {_first_line(err)}" + (_no_credentials(str(path)) or
                         "; check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")) from None


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


@contextmanager
def staged(dest: str | os.PathLike | RemotePath, last: tuple[str, ...] = (), whole: bool = False) -> Iterator[Path]:
    """A local directory to write ``dest``'s files into: ``dest`` itself when local; for a URI a
    temporary directory uploaded (one put per file, ``last`` names put after all others, e.g. the
    file whose presence says a run finished) when the block ends without an error.

    ``whole``: a local ``dest`` too gets its files only when the block ends without an error: they
    are written in a hidden staging directory inside it, renamed into place at the end (each
    top-level entry replacing its namesake, ``last`` last) and deleted on an error, so a failed
    stage leaves ``dest`` as it was, with no partial outputs."""
    target = as_path(dest)
    if not isinstance(target, RemotePath):
        target.mkdir(parents=True, exist_ok=True)
        if not whole:
            yield target
            return
        staging = target / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            yield staging
            _publish(staging, target, last)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="dynamo-stage-") as tmp:
        local = Path(tmp)
        yield local
        upload_dir(local, target, last=last)


def _publish(staging: Path, target: Path, last: tuple[str, ...]) -> None:
    """Rename ``staging``'s top-level entries into ``target`` (same filesystem: each rename is atomic),
    replacing entries of the same name; ``last`` names go after the others."""
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in last, p.name))
    for p in entries:
        dest = target / p.name
        if dest.is_dir() and not dest.is_symlink():
            old = target / f".replaced-{uuid.uuid4().hex}"  # a directory cannot be renamed over a full one
            dest.rename(old)
            p.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(p, dest)


def upload_dir(local: Path, dest: RemotePath, last: tuple[str, ...] = ()) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() in last)
    for p in files:
        (dest / p.relative_to(local).as_posix()).write_bytes(p.read_bytes())


@contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """A local file (or directory tree) with ``path``'s contents for libraries that read local paths."""
    if not isinstance(path, RemotePath):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dynamo-read-") as tmp:
        local = Path(tmp) / path.name
        if path.is_dir():
            for child in path.files():
                out = local / child.relative_to(path)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(child.read_bytes())
        else:
            local.write_bytes(path.read_bytes())
        yield local


def move(src: AnyPath, dest: AnyPath) -> None:
    """Rename a file or directory tree; on an object store a copy of each object, then its delete."""
    if not isinstance(src, RemotePath):
        src.rename(dest)
        return
    files = [src] if src.is_file() else src.files()
    for f in files:
        target = dest if f == src else dest / f.relative_to(src).as_posix()
        src.fs.copy_file(f.fs_path, target.fs_path)
    for f in files:
        f.unlink(missing_ok=True)


def remove_tree(path: AnyPath) -> None:
    if isinstance(path, RemotePath):
        path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["RemotePath", "as_path", "absolute", "is_uri", "filesystem", "open_input", "write_bytes_atomic",
           "check_writable", "ray_storage_kwargs", "relative", "staged", "upload_dir", "local_copy", "move", "remove_tree"]
