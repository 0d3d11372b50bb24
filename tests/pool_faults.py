"""Fault injection against a CPU (gloo) pool: one fault, then a good job, with the checks the soak test makes.

Used by tests/test_pool_faults.py (every fault once, in CI) and run directly for the long soak whose figures are
in README's reliability section:

    PYTHONPATH=. XDIT_COGVIDEO_TESTING=1 python tests/pool_faults.py --rounds 12   # 12 x 10 = 120 faults
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass

import psutil

from comfyui_xdit_cogvideo import GenerationRequest, Layout, LayoutError
from comfyui_xdit_cogvideo.errors import GenerationCancelled, PoolStalled, WorkerError
from comfyui_xdit_cogvideo.pool import ModelSpec, WorkerPool

SPEC = ModelSpec("tiny", dtype="fp32")
# Deadlines short enough for CI (the defaults are minutes); each fault's bound below follows from them.
OPTIONS = dict(heartbeat_timeout=5.0, stall_floor=6.0, cancel_timeout=3.0, error_grace=2.0, startup_timeout=120.0)
SLACK = 6.0  # detection to the caller's exception: teardown, reaping, a busy 2-core machine

FAULTS = ("kill9", "sigstop", "hang", "partial", "tamper", "raise_one", "raise_all", "cancel", "cancel_stuck",
          "bad_layout")
KEEPS_POOL = {"cancel", "bad_layout"}
BOUND = {  # seconds from the fault to the caller's exception
    "kill9": 2.0 + SLACK, "sigstop": OPTIONS["heartbeat_timeout"] + SLACK,
    "hang": OPTIONS["stall_floor"] + SLACK, "partial": OPTIONS["heartbeat_timeout"] + SLACK,
    "tamper": 2.0 + SLACK, "raise_one": OPTIONS["error_grace"] + SLACK, "raise_all": OPTIONS["error_grace"] + SLACK,
    "cancel": 2.0 + SLACK, "cancel_stuck": OPTIONS["cancel_timeout"] + SLACK, "bad_layout": 1.0,
}
EXPECTED = {
    "kill9": (WorkerError, "SIGKILL"), "sigstop": (WorkerError, "sent nothing for"),
    "hang": (PoolStalled, "rank 1 .* is behind"), "partial": (WorkerError, "in the middle of a message"),
    "tamper": (WorkerError, "failed its check"), "raise_one": (WorkerError, "injected fault on rank 1"),
    "raise_all": (WorkerError, "injected fault on rank"), "cancel": (GenerationCancelled, "cancelled"),
    "cancel_stuck": (GenerationCancelled, "did not stop within"), "bad_layout": (LayoutError, "does not divide"),
}


@dataclass
class Outcome:
    kind: str
    seconds: float  # fault (or cancel) to the caller's exception
    error: str
    kept: bool  # the same worker processes serve the next job
    orphans: list  # pids of the old pool still alive after a restart
    next_ok: bool


def pids(pool: WorkerPool) -> list[int]:
    return [r["pid"] for r in pool.status()["ranks"]]


def alive(pid_list) -> list[int]:
    out = []
    for pid in pid_list:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def request(steps: int) -> GenerationRequest:
    """Embeddings instead of text: a restarted pool then loads no text encoder (the soak measures faults)."""
    import torch

    embeds = torch.randn(2, 1, 226, 32, generator=torch.Generator().manual_seed(0))
    return GenerationRequest(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], steps=steps, seed=7)


def run_fault(pool: WorkerPool, kind: str) -> Outcome:
    """Inject ``kind`` into a job on a started 2-rank pool, then run a good job; measure and check."""
    import re

    pool.start()
    before = pids(pool)
    marks: dict[str, float] = {}
    events: list = []

    def on_event(event):
        events.append(event)
        marks["last_event"] = time.monotonic()

    def signal_at_step(sig):
        def run():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if sum(e.phase == "sample" for e in events) >= 2:
                    marks["fault"] = time.monotonic()
                    os.kill(before[1], sig)
                    return
                time.sleep(0.005)
        threading.Thread(target=run, daemon=True).start()

    cancel = None
    layout = None
    if kind == "kill9":
        signal_at_step(signal.SIGKILL)
    elif kind == "sigstop":
        signal_at_step(signal.SIGSTOP)
    elif kind in ("hang", "partial", "tamper"):
        pool.inject_fault(1, kind, step=2)
    elif kind == "raise_one":
        pool.inject_fault(1, "raise", step=2)
    elif kind == "raise_all":
        pool.inject_fault(0, "raise", step=2)
        pool.inject_fault(1, "raise", step=2)
    elif kind == "cancel":
        def after_two_steps():
            if len(events) >= 2:
                marks.setdefault("fault", time.monotonic())
                return True
            return False
        cancel = after_two_steps
    elif kind == "cancel_stuck":
        pool.inject_fault(1, "hang", step=2)

        def while_stuck():  # pressed a second after the last step, while rank 1 is stuck
            if "last_event" in marks and time.monotonic() - marks["last_event"] > 1.0:
                marks.setdefault("fault", time.monotonic())
                return True
            return False
        cancel = while_stuck
    elif kind == "bad_layout":
        layout = Layout(1, 4, 1)  # 4 does not divide tiny's 6 heads, and the pool has 2 ranks
    else:
        raise ValueError(kind)
    started = time.monotonic()
    error: BaseException | None = None
    try:
        pool.generate(SPEC, request(400), layout=layout, on_event=on_event, cancel=cancel)
    except Exception as caught:  # noqa: BLE001 - measured and checked below
        error = caught
    ended = time.monotonic()
    origin = marks.get("fault") or (marks.get("last_event") if kind not in ("bad_layout",) else started) or started
    expected_type, pattern = EXPECTED[kind]
    if not isinstance(error, expected_type) or not re.search(pattern, str(error)):
        raise AssertionError(f"{kind}: expected {expected_type.__name__} matching {pattern!r}, got {error!r}")
    after_fault = pids(pool)
    kept = after_fault == before
    orphans = [] if kept else alive(before)
    next_ok = True
    try:
        pool.generate(SPEC, request(2))
    except Exception:  # noqa: BLE001 - reported as a failed next job
        next_ok = False
    if not kept:
        kept = pids(pool) == before
    return Outcome(kind, ended - origin, f"{type(error).__name__}: {error}", kept, orphans, next_ok)


def check(outcome: Outcome) -> None:
    assert outcome.next_ok, f"{outcome.kind}: the next job failed"
    assert "Warning" not in outcome.error, f"{outcome.kind}: unrelated output in the error: {outcome.error}"
    assert outcome.orphans == [], f"{outcome.kind}: processes of the old pool still alive: {outcome.orphans}"
    assert outcome.kept == (outcome.kind in KEEPS_POOL), \
        f"{outcome.kind}: warm pool {'kept' if outcome.kept else 'restarted'}, expected the opposite"
    assert outcome.seconds <= BOUND[outcome.kind], \
        f"{outcome.kind}: {outcome.seconds:.1f} s to the error, bound {BOUND[outcome.kind]:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description="Long fault soak of a cpu:2 pool (README reliability figures).")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of every fault kind (default 12: 120 faults)")
    parser.add_argument("--json", default=None, help="also write the outcomes here")
    args = parser.parse_args()
    os.environ.setdefault("XDIT_COGVIDEO_TESTING", "1")
    from comfyui_xdit_cogvideo.tiny import ensure_tiny

    ensure_tiny("2b")
    pool = WorkerPool("cpu:2", echo_output=False, **OPTIONS)
    outcomes: list[Outcome] = []
    hangs = failures = 0
    all_pids: set[int] = set()
    try:
        for round_ in range(args.rounds):
            for kind in FAULTS:
                all_pids.update(pids(pool.start()))
                try:
                    outcome = run_fault(pool, kind)
                    check(outcome)
                except AssertionError as error:
                    failures += 1
                    hangs += "s to the error" in str(error)
                    print(f"FAIL {error}", flush=True)
                    continue
                outcomes.append(outcome)
                print(f"{round_ + 1:3d} {kind:12s} {outcome.seconds:6.2f} s  {outcome.error.splitlines()[0][:90]}", flush=True)
    finally:
        all_pids.update(r["pid"] for r in pool.status()["ranks"])
        pool.shutdown()
    orphans = alive(all_pids)
    print("\n| fault | n | median s to a clear error | max s | bound s |")
    print("|---|---|---|---|---|")
    for kind in FAULTS:
        times = [o.seconds for o in outcomes if o.kind == kind]
        if times:
            print(f"| {kind} | {len(times)} | {statistics.median(times):.2f} | {max(times):.2f} | {BOUND[kind]:.0f} |")
    print(f"\nfaults: {len(outcomes) + failures}, failed checks: {failures}, hangs (over the bound): {hangs}, "
          f"orphan processes: {len(orphans)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(o) for o in outcomes], f, indent=1)
    return 1 if failures or orphans else 0


if __name__ == "__main__":
    raise SystemExit(main())
