"""Process groups for one layout, built without global state.

Every process of the default group must call ``ParallelGroups.create`` with the same arguments (torch requires
all ranks to take part in ``new_group``); ranks outside the layout get ``None``. That lets one world of
processes run layouts of different sizes, which the tests and a pool that changes layouts rely on.

The default group must not be bound to a device (``init_process_group(device_id=...)``) when a layout uses fewer
ranks than the world: torch (2.6 - 2.14) then creates NCCL subgroups by splitting the default communicator, and a
rank outside a *gloo* subgroup (our control group) performs an NCCL "no-colour" split that no member matches, so
it blocks forever holding the GIL (seen on two H200s: the benchmark's one-GPU reference hung rank 1, and a pool
job on one rank of two froze rank 1's heartbeats). Unbound, every NCCL communicator is created lazily among its
members only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from ..layout import Layout


@dataclass
class ParallelGroups:
    layout: Layout
    rank: int
    world: "dist.ProcessGroup | None"
    ulysses: "dist.ProcessGroup | None"
    ring: "dist.ProcessGroup | None"
    control: "dist.ProcessGroup | None"

    @property
    def cfg_idx(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def ring_idx(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def ulysses_idx(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def seq_idx(self) -> int:
        return self.ring_idx * self.layout.ulysses + self.ulysses_idx

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls(Layout(), 0, None, None, None, None)

    @classmethod
    def create(cls, layout: Layout, ranks: Sequence[int] | None = None) -> "ParallelGroups | None":
        """Groups for ``layout`` over global ``ranks`` (default: the first ``layout.world_size`` ranks)."""
        if layout.world_size == 1 and not dist.is_initialized():
            return cls.single()
        if not dist.is_initialized():
            raise RuntimeError(f"layout {layout} needs torch.distributed to be initialized")
        ranks = list(range(layout.world_size)) if ranks is None else sorted(ranks)
        if layout.world_size > dist.get_world_size():
            raise ValueError(f"layout {layout} needs {layout.world_size} ranks, the world has {dist.get_world_size()}")
        if len(ranks) != layout.world_size:
            raise ValueError(f"layout {layout} needs {layout.world_size} ranks, got {len(ranks)}")
        me = dist.get_rank()
        backend = dist.get_backend()
        if len(ranks) < dist.get_world_size() and backend != "gloo" and _bound_device() is not None:
            raise RuntimeError(
                f"layout {layout} uses {len(ranks)} of {dist.get_world_size()} ranks, but the default process group "
                f"was initialized with device_id={_bound_device()}: torch then makes every rank outside a gloo "
                "subgroup split the NCCL communicator alone, which never returns. Initialize it without device_id "
                "(call torch.cuda.set_device first), as the pool and benchmarks do")
        world = _group(ranks, me)
        control = _group(ranks, me, backend="gloo") if backend != "gloo" else world
        u, r = layout.ulysses, layout.ring
        ulysses = ring = None
        for c in range(layout.cfg):
            for i in range(r):
                g = _group([ranks[(c * r + i) * u + j] for j in range(u)], me)
                ulysses = g if g is not None else ulysses
            for j in range(u):
                g = _group([ranks[(c * r + i) * u + j] for i in range(r)], me)
                ring = g if g is not None else ring
        if me not in ranks:
            return None
        return cls(layout, ranks.index(me), world, ulysses, ring, control)


def _bound_device():
    """The device the default group was bound to by ``init_process_group(device_id=...)``, else None."""
    return getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)


def _group(ranks: list[int], me: int, backend: str | None = None) -> "dist.ProcessGroup | None":
    group = dist.new_group(ranks, backend=backend)
    return group if me in ranks else None
