"""Run state of long scoring and ablation runs: saved atomically, resumed only if it fits.

A run state is the partial sums of a :class:`~fxgndi.core.moments.RunningMoments` plus how many
batches produced them and the settings they belong to. It is written to a temporary file in
the same folder and moved over the old one with ``os.replace``, so an interrupted save leaves
the previous state intact. Under ``torchrun`` each rank keeps its own file
(``PATH.rank<r>-of-<world>``): a resumed run must use the same number of processes.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from fxgndi.core.errors import FxgndiError
from fxgndi.core.files import atomic_path

FORMAT = "fxgndi-run-state-1"


class RunStateError(FxgndiError, ValueError):
    """A saved run state cannot be resumed: unreadable, or from a run with other settings."""


def rank_path(path: str | os.PathLike, rank: int, world: int) -> str:
    """The file of one rank: ``path`` itself for a single process.

    Example:
        >>> rank_path("run.pt", 0, 1), rank_path("run.pt", 1, 4)
        ('run.pt', 'run.pt.rank1-of-4')
    """
    path = os.fspath(path)
    return path if world == 1 else f"{path}.rank{rank}-of-{world}"


def check_world(path: str | os.PathLike, world: int) -> None:
    """Raise RunStateError when the states at ``path`` were saved by another number of
    processes (their files would silently be ignored, and the run restarted).

    Example:
        >>> check_world("/tmp/no-such-fxgndi-run.pt", 4)
    """
    base = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(base)) or "."
    if not os.path.isdir(folder):
        return
    name = os.path.basename(base)
    found = {1} if os.path.exists(base) else set()
    for entry in os.listdir(folder):
        match = re.fullmatch(re.escape(name) + r"\.rank\d+-of-(\d+)", entry)
        if match:
            found.add(int(match.group(1)))
    if found and world not in found:
        raise RunStateError(f"the run state {base!r} was saved by {sorted(found)[0]} "
                            f"process(es), but this run has {world}: resume with the same "
                            "number of processes, or delete the files to start again")


def save_state(path: str | os.PathLike, *, settings: dict[str, Any], batches: int,
               sums: dict[str, torch.Tensor], complete: bool = False) -> None:
    """Write a run state atomically (temp file in the same folder, then ``os.replace``).

    Example:
        >>> save_state("/tmp/fxgndi-doc.pt", settings={"p": 2}, batches=3,
        ...            sums={"count": torch.tensor(12.0)})
        >>> load_state("/tmp/fxgndi-doc.pt", settings={"p": 2})["batches"]
        3
    """
    state = {"format": FORMAT, "settings": settings, "batches": int(batches),
             "sums": {k: v.detach().cpu() for k, v in sums.items()}, "complete": complete}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | os.PathLike, *, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` if it was made with the same ``settings``; None (with a
    warning) when there is no file yet, so that the first run of a ``--resume`` job starts.

    Raises RunStateError when the file is not a run state or its settings differ (naming the
    differing settings).

    Example:
        >>> load_state("/tmp/no-such-fxgndi-state.pt", settings={})  # doctest: +SKIP
        None
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        warnings.warn(f"no saved run state at {path!r}: starting from the first batch",
                      RuntimeWarning, stacklevel=2)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunStateError(f"cannot read the run state {path!r} ({type(exc).__name__}: {exc});"
                            " delete it to start again") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RunStateError(f"{path!r} is not an fxgndi run state; delete it or choose another "
                            "path")
    saved = state["settings"]
    differ = sorted(k for k in set(saved) | set(settings)
                    if _plain(saved.get(k)) != _plain(settings.get(k)))
    if differ:
        detail = ", ".join(f"{k}: saved {_short(saved.get(k))} != now {_short(settings.get(k))}"
                           for k in differ[:5])
        raise RunStateError(f"the run state {path!r} belongs to a run with other settings "
                            f"({detail}); rerun with the same settings, or delete it to start "
                            "again")
    return state


def _plain(value: Any) -> Any:
    """Tuples and lists compare alike (a saved tuple may come back as a list)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
