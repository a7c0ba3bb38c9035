"""What the host offers, read without importing torch: the server and the trainer ask the same questions."""

from __future__ import annotations

import os
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo(field: str) -> str | None:
    """The first CPU's `field` line in /proc/cpuinfo, or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(field)), None)


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str | None:
    """The CPU's name ("AMD EPYC"), or None where /proc/cpuinfo gives none."""
    return _cpuinfo("model name")


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """AVX512-BF16 or AMX. Elsewhere bf16 is emulated: vLLM served 24 tok/s in bf16 against 115 in
    float32 on an AVX2-only CPU (docs/benchmarks.md)."""
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)


def gpu_present() -> bool:
    return Path("/dev/nvidia0").exists()


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
