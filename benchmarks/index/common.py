"""What the index benchmarks share: a timestamped log line and the header of a results file."""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def results_header(script: str, args: Any) -> dict[str, Any]:
    """The command that reproduces the run (every option as given), the machine and the start time."""
    options = []
    for key, value in vars(args).items():
        if key in ("table", "out", "results") or value in (False, None):
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        options.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {shown}"))
    return {
        "command": f"python benchmarks/index/{script} " + " ".join(options),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
