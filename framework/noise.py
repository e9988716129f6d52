"""The diffusion randomness of training: t, eps and the null-text dropout draws, indexed by global
sample position so that N ranks draw exactly what 1 rank draws. Torch only."""
from __future__ import annotations

import torch

from .dist import rank_seed

__all__ = ["NoiseStream"]


class NoiseStream:
    """t, eps and the null-text dropout draws for one micro step.

    mode "global" (default): every rank runs the same generator and draws the whole global micro
    batch (world x B samples), then keeps its own slice. The noise a sample gets depends on its
    global position only, so N ranks reproduce 1 rank exactly, and a resume on another world size
    continues the same stream. The extra draws cost O(global batch) random numbers per step.
    mode "rank": each rank draws only its own B samples from a rank-seeded generator.
    ``gen`` is the generator itself, for objectives that draw more (e.g. a posterior sample).
    """

    def __init__(self, seed: int, rank: int, world: int, device: torch.device, mode: str = "global"):
        self.rank, self.world, self.mode, self.device = rank, world, mode, device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(rank_seed(seed, 0 if mode == "global" else rank, stream=1))

    def draw(self, shape: tuple, timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> t (B,) int64 in 1..T, eps (B,C,H,W), u (B,) uniform for dropout."""
        b = shape[0]
        n = b * self.world if self.mode == "global" else b
        lo = self.rank * b if self.mode == "global" else 0
        t = torch.randint(1, timesteps + 1, (n,), generator=self.gen, device=self.device)[lo:lo + b]
        eps = torch.randn((n,) + tuple(shape[1:]), generator=self.gen, device=self.device)[lo:lo + b]
        u = torch.rand((n,), generator=self.gen, device=self.device)[lo:lo + b]
        return t, eps, u

    def randn(self, shape: tuple) -> torch.Tensor:
        """A standard normal draw for this rank's slice of a global micro batch of ``shape`` (per rank)."""
        b = shape[0]
        n = b * self.world if self.mode == "global" else b
        lo = self.rank * b if self.mode == "global" else 0
        return torch.randn((n,) + tuple(shape[1:]), generator=self.gen, device=self.device)[lo:lo + b]

    def state_dict(self) -> dict:
        return {"mode": self.mode, "state": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["state"])
