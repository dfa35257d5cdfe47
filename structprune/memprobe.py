"""Peak transient memory of a code region on the CPU, the way `torch.cuda.max_memory_allocated`
would see it on a device.

`measure_peak` runs a region under `torch.profiler` with ``profile_memory=True`` and replays the
allocator's ``[memory]`` events (allocations positive, frees negative bytes) in time order: the
running sum is what the region holds above what was allocated when it started, and its maximum is
the region's peak, the analogue of ``max_memory_allocated() - memory_allocated()`` taken at the
region's start. Frees of blocks that predate the region are not subtracted: for a region that
frees its inputs the peak is an upper bound (the regions measured here free only what they
allocate). The events carry no address, so a free counts only against a live allocation of the
same size made in the region: torch's CPU allocator remembers the size of every block allocated
under any profile until a profiled free, so a block freed after an earlier region leaves a stale
size that a later block at the same address reports when it is freed (the full test suite saw a
region's 4 MB reported as 2.82 MB that way).

Exact by the caching allocator's rules only on the CPU (no block rounding, no reserved slack);
on CUDA use the ledger's `torch.cuda` counters instead. Library code: no app imports.
"""

from __future__ import annotations

import contextlib
from collections import Counter
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
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (t_ns, bytes) counted

    @classmethod
    def from_events(cls, events: list[tuple[int, int]]) -> ProbeResult:
        live: Counter[int] = Counter()  # sizes of the region's own blocks not yet freed
        counted = []
        for t, nbytes in sorted(events):
            if nbytes > 0:
                live[nbytes] += 1
            elif live[-nbytes]:
                live[-nbytes] -= 1
            else:
                continue  # a block from before the region
            counted.append((t, nbytes))
        run = peak = total = largest = n = 0
        for _, nbytes in counted:
            run += nbytes
            peak = max(peak, run)
            if nbytes > 0:
                n += 1
                total += nbytes
                largest = max(largest, nbytes)
        return cls(peak, run, n, total, largest, counted)


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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        yield result
    done = ProbeResult.from_events(_memory_events(prof))
    for name in ("peak", "retained", "allocations", "allocated_bytes", "largest", "events"):
        setattr(result, name, getattr(done, name))


def measure_peak(fn: Callable, *args, **kwargs) -> tuple[object, ProbeResult]:
    """Calls ``fn(*args, **kwargs)`` under `probe`; returns (its value, the ProbeResult)."""
    with probe() as r:
        value = fn(*args, **kwargs)
    return value, r


__all__ = ["ProbeResult", "probe", "measure_peak"]
