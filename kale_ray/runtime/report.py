"""What every method's report shares: one number format (:func:`fmt`), a small markdown builder
(:class:`Markdown`: title, paragraphs, bullet lists, tables, the "Time per stage" section every
recipe ends with), the machine a run ran on, a proportion's interval and a paired difference's. Each method's
``methods/<m>/report.py`` writes only what is its own with it.

Pure (math + platform + pathlib; the framework versions are read only when asked for).
"""
from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 0) for n=0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a: Mapping[str, bool], b: Mapping[str, bool], z: float = 1.96) -> dict[str, Any]:
    """``b - a`` per item on the items both answered (+1, 0 or -1 each): the mean difference with a 95%
    normal interval of the paired differences, and how many items only ``a`` / only ``b`` got right
    (``diff`` and ``ci95`` None for fewer than two shared items)."""
    d = [int(bool(b[k])) - int(bool(a[k])) for k in sorted(set(a) & set(b))]
    n = len(d)
    out: dict[str, Any] = {"n": n, "diff": None, "ci95": [None, None], "only_a_right": d.count(-1),
                           "only_b_right": d.count(1)}
    if n >= 2:
        m = sum(d) / n
        half = z * math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
        out.update(diff=m, ci95=[m - half, m + half])
    return out


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


# --------------------------------------------------------------------------- markdown


def fmt(x: Any, digits: int = 3) -> str:
    """A report cell: ``-`` for a missing value (None, NaN, inf), a float with ``digits`` decimals,
    anything else as ``str``."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def delta(a: float | None, b: float | None, digits: int = 3) -> str:
    """``b - a`` with its sign (``-`` when either is missing)."""
    return "-" if a is None or b is None else f"{b - a:+.{digits}f}"


def dig(tree: Any, *keys: str) -> Any:
    """``tree[k1][k2]...``, None where a level is missing (reports of partial runs)."""
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _seconds(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


class Markdown:
    """A report's lines; every block is followed by one blank line.

    >>> md = Markdown("KARD report")
    >>> _ = md.section("Accuracy").table(["model", "accuracy"], [["a", 0.5]])
    >>> md.text()
    '# KARD report\\n\\n## Accuracy\\n\\n| model | accuracy |\\n|---|---|\\n| a | 0.500 |\\n'
    """

    def __init__(self, title: str) -> None:
        self.lines: list[str] = []
        self._block([f"# {title}"])

    def _block(self, lines: Iterable[str]) -> Markdown:
        self.lines += [*lines, ""]
        return self

    def para(self, *lines: str) -> Markdown:
        """A paragraph: its lines one after the other."""
        return self._block(lines)

    def section(self, title: str, level: int = 2) -> Markdown:
        return self._block([f"{'#' * level} {title}"])

    def bullets(self, items: Iterable[str]) -> Markdown:
        return self._block(f"- {x}" for x in items)

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Markdown:
        """A table; a cell that is not a string goes through :func:`fmt` (format numbers with their
        own digits before, where 3 is not the right number)."""
        cell = lambda x: x if isinstance(x, str) else fmt(x)  # noqa: E731
        return self._block(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                            *("| " + " | ".join(cell(x) for x in row) + " |" for row in rows)])

    def timings(self, seconds: Mapping[str, float], *, reused: Sequence[str] | None = None,
                extra: Iterable[tuple[str, float]] = (), when_run: Mapping[str, float] | None = None) -> Markdown:
        """The "Time per stage (s)" section: ``seconds`` per stage, then the ``extra`` rows (a stage's
        own parts). ``reused`` (the stages this run reused; None: not said) adds the note on their
        times; ``when_run`` adds a second column, each stage's time when it ran."""
        self.section("Time per stage (s)")
        if when_run is not None:
            self.para("This run" + (f" (reused: {', '.join(reused)})" if reused else "")
                      + "; the second column is the time when the stage ran.")
            return self.table(["stage", "this run", "when run"],
                              [[k, _seconds(v), _seconds(when_run.get(k))] for k, v in seconds.items()])
        if reused is not None:
            self.para("Stages reused from an earlier run show that run's time"
                      + (f" (reused here: {', '.join(reused)})." if reused else "."))
        return self.table(["stage", "seconds"], [[k, _seconds(v)] for k, v in [*seconds.items(), *extra]])

    def text(self) -> str:
        return "\n".join(self.lines)

    def write(self, out: Path, name: str = "report.md") -> Path:
        path = Path(out) / name
        path.write_text(self.text())
        return path
