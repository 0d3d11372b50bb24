"""Process groups: a device-bound default group with a layout over fewer ranks is refused, not left to hang."""

from __future__ import annotations

import torch

from comfyui_xdit_cogvideo.layout import Layout

from distributed import run_world


def _bound_nccl_world(rank: int) -> list[str]:
    """Pretend the default group is NCCL bound to a device (as init_process_group(device_id=...) makes it)."""
    import torch.distributed as dist

    from comfyui_xdit_cogvideo.parallel import groups

    groups._bound_device = lambda: torch.device("cuda", rank)
    real_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl" if group is None else real_backend(group)
    outcomes = []
    for layout in (Layout(), Layout(cfg=2)):
        try:
            made = groups.ParallelGroups.create(layout)
            outcomes.append("ok" if made is not None else "none")
        except RuntimeError as error:
            outcomes.append(str(error))
    return outcomes


def test_bound_default_group_refuses_subset_layouts_but_runs_full_ones():
    results = run_world(2, _bound_nccl_world, timeout=120)
    for outcomes in results:
        assert "uses 1 of 2 ranks" in outcomes[0] and "device_id" in outcomes[0]
        assert outcomes[1] == "ok"
