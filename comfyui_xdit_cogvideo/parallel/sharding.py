"""How the video tokens of one forward are split over the sequence-parallel ranks.

Tokens are padded at the end of the sequence to a multiple of the sequence degree and cut into equal
contiguous chunks, one per sequence rank. Padded tokens ride along through the token-wise layers but are
never used as keys and are dropped before unpatchify, so any token count works on any degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceShard:
    tokens: int
    degree: int
    ulysses: int = 1

    @property
    def chunk(self) -> int:
        return max(1, math.ceil(self.tokens / self.degree))

    @property
    def padded(self) -> int:
        return self.chunk * self.degree

    @property
    def ring_block(self) -> int:
        """Tokens one ring block holds after the Ulysses all-to-all (its ``ulysses`` chunks together)."""
        return self.chunk * self.ulysses

    def ring_valid(self, ring_idx: int) -> int:
        """Real (unpadded) tokens in ring block ``ring_idx``."""
        return max(0, min(self.ring_block, self.tokens - ring_idx * self.ring_block))

    def local_tokens(self, seq_idx: int) -> int:
        """Real (unpadded) tokens in sequence rank ``seq_idx``'s chunk."""
        return max(0, min(self.chunk, self.tokens - seq_idx * self.chunk))

    def local(self, x: torch.Tensor, seq_idx: int, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of ``x`` along ``dim`` (which holds all ``tokens``)."""
        if x.shape[dim] != self.tokens:
            raise ValueError(f"expected {self.tokens} tokens along dim {dim}, got shape {tuple(x.shape)}")
        pad = self.padded - self.tokens
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
            x = F.pad(x, widths)
        return x.narrow(dim, seq_idx * self.chunk, self.chunk)
