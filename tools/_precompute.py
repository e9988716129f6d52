"""The command line the precompute tools share (tools.precompute_latents, tools.precompute_text):
source and output folders, a YAML preset with dotted overrides, the device, the rank wait, and the
text encoder's options."""
from __future__ import annotations

import argparse
from typing import Optional

TEXT_FLAGS = {"text_encoder": "text.encoder", "max_length": "text.max_length"}


def precompute_parser(prog: str, doc: str, batch_size: int, batch_help: str, sections: str) -> argparse.ArgumentParser:
    """The common arguments; ``sections``: the config sections the tool reads (for the help)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="input shards.json or its folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", "-c", default=None, help=f"YAML preset (its {sections} sections are used)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--wait", type=float, default=3600.0, help="rank 0 waits this long for the others")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def add_text_args(p: argparse.ArgumentParser) -> None:
    """The text encoder's options (shorthands for the text.encoder / text.max_length overrides)."""
    p.add_argument("--text-encoder", default=None, metavar="NAME_OR_PATH",
                   help="the frozen text encoder: a local directory, a hub id or a packaged alias (text.encoder)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per caption (text.max_length)")


def text_overrides(args: argparse.Namespace) -> list[str]:
    """--text-encoder / --max-length as dotted overrides (after the positional ones: the flags win)."""
    return [f"{key}={getattr(args, name)}" for name, key in TEXT_FLAGS.items() if getattr(args, name) is not None]


def check_overrides(p: argparse.ArgumentParser, overrides: list[str], prefixes: tuple[str, ...]) -> None:
    bad = [o for o in overrides if not o.startswith(prefixes)]
    if bad:
        p.error(f"only {' / '.join(x + '*' for x in prefixes)} overrides apply here: {bad}")


def device_of(args: argparse.Namespace, local_rank: int) -> str:
    import torch

    if args.device is not None:
        return args.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def text_encoder_from(tcfg, device: Optional[str]):
    """The frozen encoder and its identity for the manifest."""
    from framework.data.precompute import text_encoder_info
    from framework.models.text import TextEncoder

    return TextEncoder(tcfg, device=device), text_encoder_info(tcfg)
