"""One storage layer for every path option: local paths and URIs (file://, s3://, gs://, ...).

Everything goes through `pyarrow.fs`, so the same code reads and writes a laptop's disk, a
shared volume on Kubernetes, or an object store. Two guarantees matter to the stages:

- **Atomic writes.** A file appears under its final name complete or not at all. Locally:
  write a temp file in the same directory, fsync, rename. On object stores a single PUT is
  already atomic (an object becomes visible only when its upload completes).
- **Completion markers.** A stage writes `_SUCCESS` last; `is_complete(dir)` is how a rerun or
  a pipeline knows a stage's output is whole and can be skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"

# `memory://` is an in-process object store (pyarrow's mock filesystem): it behaves like S3
# (no rename, no directories of its own), which makes the object-store code paths testable.
_MEMORY_FS: pafs.FileSystem | None = None

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask. Reading it means setting it, so threads take turns."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file (0644 under umask 022). `tempfile.mkstemp` makes
    0600 files, which a serving pod or a colleague on a shared volume cannot read."""
    return 0o666 & ~umask()


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_local(path: str) -> bool:
    return not is_uri(path) or str(path).startswith("file://")


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path within it for a local path or URI."""
    path = str(path)
    if path.startswith("memory://"):
        global _MEMORY_FS
        if _MEMORY_FS is None:
            _MEMORY_FS = pafs._MockFileSystem()
        return _MEMORY_FS, path[len("memory://") :].rstrip("/")
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except pa_errors() + (ValueError,) as e:
        raise ValueError(f"cannot open storage URI {path!r}: {e}") from None
    return fs, inner.rstrip("/")


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    base = str(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def local_path(path: str) -> str:
    """The local filesystem path of a local path or file:// URI."""
    if not is_local(path):
        raise ValueError(f"{path} is not on the local filesystem")
    return resolve(path)[1]


def absolute(path: str) -> str:
    """`path` as another process on this machine can use it (a Ray worker or actor runs in
    another working directory): a local path or file:// URI as an absolute local path; any
    other URI as it is."""
    return local_path(path) if is_local(path) else path


def relative_to(root: str, path: str) -> str | None:
    """`path` relative to `root` (with `/`) when it lies under it, else None. Pointer files
    store this, so they survive a moved or re-mounted root and any working directory."""
    if is_uri(root) or is_uri(path):
        base = root.rstrip("/") + "/"
        return path[len(base) :].strip("/") if path.startswith(base) else None
    rel = os.path.relpath(resolve(path)[1], resolve(root)[1])
    outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
    return None if outside else rel.replace(os.sep, "/")


def find_under(root: str, stored: str) -> str:
    """The path a pointer file under `root` names, as this process can open it.

    What lmforge writes is relative to `root`. Older pointers hold an absolute path or URI,
    or a path relative to the working directory their run started in: those are looked up
    by their trailing parts under `root` (so a moved `root` still works), then as they are.
    Nothing found: the new-style reading, for the caller's error message.
    """
    relative = not is_uri(stored) and not os.path.isabs(stored)
    if relative and exists(join(root, stored)):
        return join(root, stored)
    parts = [p for p in stored.replace("\\", "/").split("/") if p]
    for i in range(1, len(parts) - 1):  # at least <stage>/<run>: never a bare name
        candidate = join(root, *parts[i:])
        if exists(candidate):
            return candidate
    if exists(stored):
        return stored
    return join(root, stored) if relative else stored


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def remove(path: str) -> None:
    """Remove a file or a directory tree; missing is fine."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def list_files(path: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a directory, sorted, as paths/URIs in the same form as `path`."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
    rel = sorted(
        posixpath.relpath(i.path, p) if is_uri(path) else os.path.relpath(i.path, p)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [join(path, r) for r in rel]


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[IO[bytes]]:
    """Open `path` for writing so that it appears complete or not at all.

    On an exception (or a kill) before the block ends, nothing is left under `path`: locally
    only a hidden `.tmp-*` file in the same directory, which is removed on exceptions.
    """
    fs, p = resolve(path)
    parent = (
        posixpath.dirname(p) if not isinstance(fs, pafs.LocalFileSystem) else os.path.dirname(p)
    )
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(p)}-", dir=parent)
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    # Object stores: the object becomes visible only when the upload completes. Buffer, then
    # write in one go, so an exception inside the block never starts an upload at all.
    buf = _Buffer()
    yield buf
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as out:
        out.write(buf.getvalue())


class _Buffer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def mark_success(directory: str, info: dict[str, Any] | None = None) -> None:
    """Write the `_SUCCESS` marker last, with when and (optionally) a summary of the output."""
    write_json(
        join(directory, SUCCESS),
        {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})},
    )


def is_complete(directory: str) -> bool:
    """True when a stage finished writing `directory` (its `_SUCCESS` marker exists)."""
    return exists(join(directory, SUCCESS))
