"""The console entry point every tool shares."""
from __future__ import annotations

import argparse
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


def classifier_guidance_group(p: argparse.ArgumentParser, title: str):
    """The flags every sampling tool takes for classifier guidance (docs/classifier_guidance.md): the
    classifier and the form of the guidance. Returns the group, for the tool's own flags (its scales,
    its target)."""
    g = p.add_argument_group(f"{title} (docs/classifier_guidance.md)")
    g.add_argument("--classifier", default=None,
                   help="noisy classifier p(y|x_t,t): a task=classifier run directory or its export")
    g.add_argument("--classifier-form", choices=["eps", "mean"], default="eps",
                   help="eps: eps - s sqrt(1-abar_t) grad log p(y|x_t) (any sampler); mean: the ancestral "
                        "mean shift mu + s beta_tilde_t grad log p(y|mu) (--sampler ddpm --no-clip)")
    return g
