"""Files written atomically: a temporary file beside the target, renamed over it on success."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary path in the folder of ``path``, ending in the same suffix;
    when the block succeeds it is renamed onto ``path`` (atomic within one file system), when
    it raises (Ctrl-C too) it is removed: ``path`` is never left half-written, and an old file
    there survives a failure. Each call gets its own name, so concurrent writers of one path
    (threads, processes) cannot clobber each other's temporary file.

    Example:
        >>> folder = tempfile.mkdtemp()
        >>> with atomic_path(f"{folder}/out.txt") as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(f"{folder}/out.txt").read(), os.listdir(folder)
        ('done', ['out.txt'])
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist; "
                                f"create it first (mkdir -p {folder}) or choose another path")
    suffix = os.path.splitext(name)[1]  # writers (savefig, exporters) look at the suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically.

    Example:
        >>> write_json(f"{tempfile.mkdtemp()}/r.json", {"a": 1})
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Where fxgndi caches what it computes once per machine (trained digits models, kernel
    timings): ``$FXGNDI_CACHE``, else ``~/.cache/fxgndi``.

    Example:
        >>> cache_dir().name in ("fxgndi", os.environ.get("FXGNDI_CACHE", "fxgndi"))
        True
    """
    env = os.environ.get("FXGNDI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fxgndi"
