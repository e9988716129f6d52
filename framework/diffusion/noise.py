"""The diffusion randomness of training: t, eps and the null-text dropout draws, indexed by global
sample position so that N ranks draw exactly what 1 rank draws. Torch only."""
from __future__ import annotations

import hashlib

import torch

from framework.dist import rank_seed

__all__ = ["NoiseStream"]


class NoiseStream:
    """t, eps and the null-text dropout draws for one micro step.

    mode "global" (default): every rank runs the same generator and draws the whole global micro
    batch (world x B samples), then keeps its own slice. The noise a sample gets depends on its
    global position only, so N ranks reproduce 1 rank exactly, and a resume on another world size
    continues the same stream. The extra draws cost O(global batch) random numbers per step.
    mode "rank": each rank draws only its own B samples from a rank-seeded generator.
    mode "buckets" (aspect-ratio buckets: ranks may hold batches of different shapes in one step):
    t and the dropout draws u as in "global" (their count depends on the batch size only, the same
    on every rank), eps from a second generator seeded afresh for each draw from (seed, draw count,
    rank). A slice of one global eps draw would not do: each rank would draw world x its OWN shape
    from the shared generator, so the ranks' streams would drift apart and overlap.
    ``gen`` is the generator itself, for objectives that draw more (e.g. a posterior sample).
    """

    def __init__(self, seed: int, rank: int, world: int, device: torch.device, mode: str = "global"):
        self.rank, self.world, self.mode, self.device = rank, world, mode, device
        self.gen = torch.Generator(device=device)
        if mode not in ("global", "rank", "buckets"):
            raise ValueError(f"noise mode {mode!r}: use 'global', 'rank' or 'buckets'")
        self.seed, self.draws = seed, 0
        self.gen.manual_seed(rank_seed(seed, rank if mode == "rank" else 0, stream=1))
        self._eps_gen = torch.Generator(device=device) if mode == "buckets" else None

    def _slice(self, b: int) -> tuple[int, int]:
        """(numbers to draw, offset of this rank's) for a per-rank batch of b."""
        if self.mode == "rank":
            return b, 0
        return b * self.world, self.rank * b

    def _randn(self, shape: tuple) -> torch.Tensor:
        """eps for this rank's (B, ...) batch."""
        b = shape[0]
        self.draws += 1
        if self._eps_gen is not None:       # "buckets": a generator of (seed, draw, rank), host-side seeding
            key = hashlib.blake2b(f"{self.seed}/{self.draws}/{self.rank}".encode(), digest_size=8).digest()
            self._eps_gen.manual_seed(int.from_bytes(key, "little") & (2 ** 63 - 1))
            return torch.randn(tuple(shape), generator=self._eps_gen, device=self.device)
        n, lo = self._slice(b)
        return torch.randn((n,) + tuple(shape[1:]), generator=self.gen, device=self.device)[lo:lo + b]

    def draw(self, shape: tuple, timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> t (B,) int64 in 1..T, eps (B,C,H,W), u (B,) uniform for dropout."""
        b = shape[0]
        n, lo = self._slice(b)
        t = torch.randint(1, timesteps + 1, (n,), generator=self.gen, device=self.device)[lo:lo + b]
        eps = self._randn(shape)
        u = torch.rand((n,), generator=self.gen, device=self.device)[lo:lo + b]
        return t, eps, u

    def randn(self, shape: tuple) -> torch.Tensor:
        """A standard normal draw for this rank's slice of a global micro batch of ``shape`` (per rank)."""
        return self._randn(shape)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "state": self.gen.get_state(), "draws": self.draws}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["state"])
        self.draws = int(sd.get("draws", 0))
