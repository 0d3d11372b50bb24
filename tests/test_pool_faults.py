"""The fault soak, short version: every fault once on a cpu:2 pool, each followed by a good job.

Each job must end within its bound with a clear error, leave no process of a stopped pool behind, and keep the
warm pool exactly when it should (a clean Cancel, a layout refused before anything ran). The long version
(tests/pool_faults.py run directly) gives the figures in README's reliability section.
"""

from __future__ import annotations

import pytest

from comfyui_xdit_cogvideo.pool import WorkerPool
from pool_faults import FAULTS, OPTIONS, alive, check, pids, run_fault

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def pool(tiny_cache, tiny_path):
    tiny_path("2b")
    pool = WorkerPool("cpu:2", echo_output=False, **OPTIONS)
    seen: set[int] = set()
    yield pool, seen
    seen.update(r["pid"] for r in pool.status()["ranks"])
    pool.shutdown()
    assert alive(seen) == [], "worker processes outlived the pool"


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_then_a_good_job(pool, kind):
    pool, seen = pool
    seen.update(pids(pool.start()))
    outcome = run_fault(pool, kind)
    seen.update(pids(pool))
    check(outcome)
