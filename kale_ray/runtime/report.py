"""What every method's report shares: the machine a run ran on and a proportion's interval. Pure
(math + platform; the framework versions are read only when asked for)."""
from __future__ import annotations

import math
import platform
from typing import Any


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 0) for n=0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def machine_info() -> dict[str, Any]:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch, transformers, ray, vllm, deepspeed  # noqa: E401

        info.update(torch=torch.__version__, transformers=transformers.__version__, ray=ray.__version__,
                    vllm=vllm.__version__, deepspeed=deepspeed.__version__)
    except Exception as e:  # versions are informative only
        info["versions_error"] = str(e)
    return info
