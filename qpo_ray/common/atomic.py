"""Writing files and directories so that a crash (kill -9, power loss) at any moment
leaves either the old version or the new one, never a mixture or a truncated file.

A file is written to a temporary sibling, fsynced, renamed over the target, and the
parent directory is fsynced (the rename itself is only durable once the directory is):
`atomic_file` / `write_*_atomic` / `replace_file`, the only file renames in qpo_ray.
A directory is written the same way as a whole: into a temporary sibling, every file
fsynced, then swapped in with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`;
elsewhere two renames, with a window of microseconds in which the path is absent but
never half-written). Depends on nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory (directories: their entries, i.e. renames)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Every file and directory below `root`, then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """`with atomic_file(p) as tmp:` write the whole file at `tmp` (any writer that takes
    a path: Parquet, safetensors); on success it is fsynced and renamed over `p`, on an
    exception `p` is left as it was and `tmp` is removed. A process killed inside the
    block leaves `p` as it was, plus a stray hidden `.<name>.*.tmp` sibling."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Not mkstemp: its 0600 would hide the file from other users (Serve); this honours
    # the umask like a plain open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        replace_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def replace_file(tmp: str | Path, path: str | Path) -> None:
    """Rename an already written `tmp` over `path`, durably: the data is fsynced before
    the rename (else a power loss can leave the new name on empty blocks), the directory
    after it (else the rename itself can be lost)."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the fully written directory `tmp` in at `final` (replacing any old one)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the old version
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """`with atomic_dir(d) as tmp:` write into `tmp`; on success it replaces `d` whole,
    on an exception `d` is left as it was and `tmp` is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from other users (Serve)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
