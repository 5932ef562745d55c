"""Clocks and interleaved rounds: how every loss benchmark times an implementation against the floor.

A shared machine drifts by 10-20 % between minutes, so an implementation is never timed alone: each
round times it and the 3-GEMM floor back to back, and the figure that ranks implementations is the
median over rounds of the per-round ratio ``time / floor time``, reported with its spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes (CUDA: events, the device synchronised around the call)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def interleaved_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, device: str, before_each: Callable[[], None]
) -> dict[str, list[float]]:
    """Time every function once per round, in an order rotated each round; ``before_each`` is untimed.

    Returns:
        ``{name: [seconds of round 0, round 1, ...]}``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            before_each()
            times[name].append(time_call(fns[name], device))
    return times


def ratio_summary(times: list[float], floor_times: list[float]) -> dict[str, float]:
    """Median time and the median, min and max over rounds of ``time / floor time`` of the same round."""
    if len(times) != len(floor_times) or not times:
        raise ValueError(f"need one floor time per round, got {len(times)} times, {len(floor_times)} floors")
    ratios = [t / f for t, f in zip(times, floor_times)]
    return {
        "time_s": statistics.median(times),
        "floor_s": statistics.median(floor_times),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": len(times),
    }
