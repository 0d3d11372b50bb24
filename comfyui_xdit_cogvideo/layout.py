"""Parallel layouts: how a world of ranks is split into CFG, Ulysses and Ring degrees.

Rank order is cfg-major, then ring, then ulysses: ``rank = (cfg_idx * ring + ring_idx) * ulysses + ulysses_idx``.
Ulysses peers are therefore adjacent ranks, which keeps the all-to-all (the heaviest collective) on the
fastest links of a host.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LayoutError  # noqa: F401  (importable from here as before)


@dataclass(frozen=True)
class Layout:
    """Degrees of CFG parallel (1 or 2), Ulysses and Ring sequence parallel."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def seq_degree(self) -> int:
        return self.ulysses * self.ring

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(cfg_idx, ring_idx, ulysses_idx) of a rank inside this layout."""
        cfg_idx, rest = divmod(rank, self.seq_degree)
        ring_idx, ulysses_idx = divmod(rest, self.ulysses)
        return cfg_idx, ring_idx, ulysses_idx

    def __str__(self) -> str:
        return f"cfg{self.cfg} x ulysses{self.ulysses} x ring{self.ring}"

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Parse ``"cfg2xulysses2xring1"``-style or ``"2,2,1"`` (cfg, ulysses, ring) strings."""
        text = text.strip().lower().replace(" ", "")
        if "," in text:
            cfg, ulysses, ring = (int(x) for x in text.split(","))
            return cls(cfg, ulysses, ring)
        degrees = {"cfg": 1, "ulysses": 1, "ring": 1}
        for part in text.split("x"):
            name = part.rstrip("0123456789")
            if name not in degrees or name == part:
                raise LayoutError(f"cannot parse layout {text!r}; write e.g. 'cfg2xulysses2xring1' or '2,2,1'")
            degrees[name] = int(part[len(name):])
        return cls(**degrees)


def check_layout(layout: Layout, *, heads: int, use_cfg: bool, world_size: int | None = None) -> None:
    """Raise LayoutError naming the broken constraint and what would work instead."""
    for name in ("cfg", "ulysses", "ring"):
        if getattr(layout, name) < 1:
            raise LayoutError(f"{name} degree must be >= 1, got {getattr(layout, name)}")
    if layout.cfg not in (1, 2):
        raise LayoutError(f"cfg degree must be 1 or 2 (conditional and unconditional branch), got {layout.cfg}")
    if layout.cfg == 2 and not use_cfg:
        raise LayoutError("cfg degree 2 needs classifier-free guidance (guidance scale > 1); use cfg 1")
    if heads % layout.ulysses:
        ok = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 8]
        raise LayoutError(
            f"ulysses degree {layout.ulysses} does not divide the model's {heads} attention heads; "
            f"ulysses must be one of {ok} (use ring for the rest of the sequence degree)"
        )
    if world_size is not None and layout.world_size != world_size:
        raise LayoutError(
            f"layout {layout} uses {layout.world_size} ranks but the pool has {world_size}; "
            f"cfg x ulysses x ring must equal the number of GPUs"
        )


def candidate_layouts(world_size: int, *, heads: int, use_cfg: bool) -> list[Layout]:
    """All valid layouts for a world size, fastest first.

    Order: CFG parallel first (one all-gather per step, the least communication), then the largest Ulysses
    degree that divides the heads (all-to-all moves 4 activations per layer but overlaps well and keeps
    attention kernels large), then Ring for what is left (exact with any head count).
    """
    layouts = []
    for cfg in (2, 1) if use_cfg else (1,):
        if world_size % cfg:
            continue
        seq = world_size // cfg
        for ulysses in range(seq, 0, -1):
            if seq % ulysses == 0 and heads % ulysses == 0:
                layouts.append(Layout(cfg, ulysses, seq // ulysses))
    return layouts


def choose_layout(
    world_size: int,
    *,
    heads: int,
    use_cfg: bool,
    cfg: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
) -> Layout:
    """Fill in unspecified degrees with the fastest valid choice; validate explicit ones."""
    if world_size < 1:
        raise LayoutError(f"world size must be >= 1, got {world_size}")
    for layout in candidate_layouts(world_size, heads=heads, use_cfg=use_cfg):
        if all(want is None or want == got for want, got in
               ((cfg, layout.cfg), (ulysses, layout.ulysses), (ring, layout.ring))):
            return layout
    complete = None not in (cfg, ulysses, ring)
    check_layout(Layout(cfg or 1, ulysses or 1, ring or 1), heads=heads, use_cfg=use_cfg,
                 world_size=world_size if complete else None)
    valid = ", ".join(str(x) for x in candidate_layouts(world_size, heads=heads, use_cfg=use_cfg))
    raise LayoutError(
        f"no valid layout for {world_size} ranks with cfg={cfg}, ulysses={ulysses}, ring={ring} "
        f"({heads} heads, guidance {'on' if use_cfg else 'off'}); valid layouts: {valid}"
    )
