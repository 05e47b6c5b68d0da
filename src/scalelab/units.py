"""Human-readable numbers with their units: counts (K, M, B, T), bytes (GiB), durations."""

from __future__ import annotations

import math


def format_count(x: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def format_bytes(x: float) -> str:
    """Bytes in GiB/MiB with binary units (what nvidia-smi and torch.cuda report)."""
    if abs(x) >= 2**30:
        return f"{x / 2**30:.2f} GiB"
    return f"{x / 2**20:.1f} MiB"


def format_duration(seconds: float) -> str:
    """Seconds as '42 s', '3.5 min', '7.2 h' or '12.0 days'; '?' when unknown (inf/NaN)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
