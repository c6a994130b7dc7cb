"""Atomic file and folder writes (a temporary name in the same folder, fsync, rename), file locks, output folders."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mixdiff_cli.core.errors import OutputError


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically. A symlinked
    `target` keeps its link: the file it points to is replaced."""
    target = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp makes 0600 files (and so do some writers, safetensors' among them): give the result the
        # target's mode, or what umask allows, once it is written
        umask = os.umask(0)
        os.umask(umask)
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~umask
        os.chmod(tmp_path, mode)
        try:
            yield tmp_path
            os.chmod(tmp_path, mode)
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, target)
        except OSError as exc:
            if exc.filename not in (None, str(tmp_path), tmp):
                raise  # about another file (one the block read): its own message names it
            raise _write_error(target, exc) from None
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _write_error(target: Path, exc: OSError) -> OutputError:
    """A failed write named by the file it was for (a full disk's OSError names no file, or the hidden temporary)."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return OutputError(f"cannot write {target}: {exc.strerror or exc}",
                       "free space on that disk, or write somewhere else" if full else "check the folder and its permissions")


def atomic_write(target: str | Path, data: bytes | str) -> Path:
    """Write `data` to `target` so that readers see the old or the new content, never a mix."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(target)


def writable_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and prove it is writable, before any model loads."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mixdiff-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to --out {out_dir}: {exc.strerror or exc}", "pass a writable output folder") from None
    return out_dir


@contextlib.contextmanager
def output_dir(out_dir: str | Path) -> Iterator[Path]:
    """`writable_dir(out_dir)` around a block that writes into it: the folders it had to create are removed
    again (while still empty) when the block fails, so a run that failed leaves nothing behind."""
    out_dir = Path(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    writable_dir(out_dir)
    try:
        yield out_dir
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only while empty
            except OSError:
                break
        raise


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` whole (files fsynced)."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        umask = os.umask(0)  # mkdtemp makes 0700 folders; give it what mkdir would
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()):
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float = 120.0, *, what: str = "file", error: type[Exception] | None = None) -> Iterator[None]:
    """Hold `.NAME.lock` beside `path` (one writer across processes); waiting past `timeout` s raises
    `error` (a MixdiffError class) naming `what`, the path and the lock file."""
    from filelock import FileLock, Timeout

    from mixdiff_cli.core.errors import MixdiffError

    path = Path(path)
    lock = FileLock(str(path.with_name(f".{path.name}.lock")))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise (error or MixdiffError)(
            f"{what} {path} is locked by another mixdiff process", f"wait for it, or delete {lock.lock_file} if none runs"
        ) from None
    try:
        yield
    finally:
        lock.release()
