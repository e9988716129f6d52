"""The console entry point every tool shares."""
from __future__ import annotations

from typing import Any, Callable, Optional


def entry_point(run: Callable[[Optional[list[str]]], Any]) -> Callable[[Optional[list[str]]], int]:
    """``main(argv) -> 0`` over ``run(argv) -> result``. setup.py's console scripts exit with what
    ``main`` returns, so a returned result (a dict, a list) would exit 1 and be printed to stderr;
    ``run`` keeps the result for Python callers and tests."""
    def main(argv: Optional[list[str]] = None) -> int:
        run(argv)
        return 0
    main.__doc__ = f"Console entry point: {run.__module__}.run, exit status 0."
    return main
