"""Peak transient memory of a code region on the CPU, the way `torch.cuda.max_memory_allocated`
would see it on a device.

`measure_peak` runs a region under `torch.profiler` with ``profile_memory=True`` and replays the
allocator's ``[memory]`` events (allocations positive, frees negative bytes) in time order: the
running sum is what the region holds above what was allocated when it started, and its maximum is
the region's peak, the analogue of ``max_memory_allocated() - memory_allocated()`` taken at the
region's start. The profiler does not report the size of a free whose allocation predates the
region, so such frees are not subtracted: for a region that frees its inputs the peak is an upper
bound (the regions measured here free only what they allocate).

Exact by the caching allocator's rules only on the CPU (no block rounding, no reserved slack);
on CUDA use the ledger's `torch.cuda` counters instead. Library code: no app imports.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class ProbeResult:
    """What a region allocated: `peak` (max of the running sum, >= 0), `retained` (the sum at the
    end: what the region left allocated, e.g. its return value), and the event counts."""

    peak: int = 0
    retained: int = 0
    allocations: int = 0
    allocated_bytes: int = 0  # every allocation of the region, summed (no frees)
    largest: int = 0  # the largest single allocation
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (t_ns, bytes)

    @classmethod
    def from_events(cls, events: list[tuple[int, int]]) -> ProbeResult:
        events = sorted(events)
        run = peak = total = largest = n = 0
        for _, nbytes in events:
            run += nbytes
            peak = max(peak, run)
            if nbytes > 0:
                n += 1
                total += nbytes
                largest = max(largest, nbytes)
        return cls(peak, run, n, total, largest, events)


def _memory_events(prof) -> list[tuple[int, int]]:
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
            out.append((int(e.start_ns()), int(e.nbytes())))
    return out


@contextlib.contextmanager
def probe() -> Iterator[ProbeResult]:
    """``with probe() as r: ...`` then read ``r.peak``: the region's peak live bytes (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    result = ProbeResult()
    # The allocator remembers the sizes of blocks allocated under any earlier profile, so a cycle
    # from an earlier probed region that the collector frees inside this one would count as a free
    # here (seen in the full test suite): collect first, and not during the region.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            yield result
    finally:
        if was_enabled:
            gc.enable()
    done = ProbeResult.from_events(_memory_events(prof))
    for name in ("peak", "retained", "allocations", "allocated_bytes", "largest", "events"):
        setattr(result, name, getattr(done, name))


def measure_peak(fn: Callable, *args, **kwargs) -> tuple[object, ProbeResult]:
    """Calls ``fn(*args, **kwargs)`` under `probe`; returns (its value, the ProbeResult)."""
    with probe() as r:
        value = fn(*args, **kwargs)
    return value, r


__all__ = ["ProbeResult", "probe", "measure_peak"]
