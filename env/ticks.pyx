# cython: language_level=3
"""Timestamps: `get_ticks()` (the TSC on x86-64: a few ns, no system call) and its rate.

The rate is measured once, against CLOCK_MONOTONIC, the first time someone asks (SPDK's
spdk_get_ticks_hz does the same); statistics convert ticks to time only when they are read.
"""
import time

from libc.stdint cimport uint64_t

from env.ticks cimport TICKS_ARE_TSC, get_ticks, now_ns

_hz = None


def ticks():
    return get_ticks()


def monotonic_ns():
    return now_ns()


def ticks_hz():
    """Ticks per second (measured over ~20 ms on first use)."""
    global _hz
    if _hz is None:
        if not TICKS_ARE_TSC:
            _hz = 1_000_000_000
        else:
            best = None
            for _ in range(3):
                t0, c0 = now_ns(), get_ticks()
                time.sleep(0.007)
                t1, c1 = now_ns(), get_ticks()
                hz = (c1 - c0) * 1e9 / (t1 - t0)
                best = hz if best is None else max(best, hz) if abs(hz - best) < best * 0.01 else hz
            _hz = int(best)
    return _hz


def ticks_to_ns(uint64_t t):
    return t * 1_000_000_000 // ticks_hz()
