"""Tables (tabulate) and figures (matplotlib, imported only when a figure is asked for)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from tabulate import tabulate

from fxgndi.core.files import atomic_path


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *,
                 floatfmt: str | Sequence[str] = ".4g", tablefmt: str = "github") -> str:
    """Render rows as a GitHub-markdown table.

    Example:
        >>> print(format_table([("a", 1.0)], ["name", "value"]))
        | name   |   value |
        |--------|---------|
        | a      |       1 |
    """
    return tabulate(rows, headers=list(headers), floatfmt=floatfmt, tablefmt=tablefmt)


def pyplot():
    """matplotlib.pyplot with a non-interactive backend, or a clear error when missing.

    Example:
        >>> plt = pyplot()  # doctest: +SKIP
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("figures need matplotlib: pip install 'fxgndi[figures]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (see :func:`fxgndi.core.files.atomic_path`) and
    close it.

    Example:
        >>> save_figure(fig, "scores.png")  # doctest: +SKIP
    """
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        pyplot().close(fig)
