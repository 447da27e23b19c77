"""Peak resident memory of this process. Torch-free."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """VmHWM on Linux: it belongs to the process image, so a child started from a big parent (a test runner that
    imported torch, say) reports its own peak. ru_maxrss survives fork+exec on Linux and would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024
