"""What every benchmark part shares: a figure (a ratio with its two raw numbers), targets, progress lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line with the seconds since the benchmark started (flushed: make shows it at once)."""
    print(f"[bench {time.perf_counter() - _START:6.1f}s] {message}", flush=True)


@dataclass
class Target:
    """A goal from the issue: ``measured`` (the ratio or the raw value) ``op`` ``threshold``."""

    name: str  # what is compared: "ratio" or the raw value's unit
    measured: float
    op: str  # ">=" or "<="
    threshold: float

    @property
    def passed(self) -> bool:
        return self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold

    def describe(self) -> str:
        unit = "x" if self.name == "ratio" else f" {self.name}"
        return f"{self.op}{self.threshold:g}{unit} {'PASS' if self.passed else 'FAIL'}"

    def to_dict(self) -> dict:
        return {"name": self.name, "measured": self.measured, "op": self.op, "threshold": self.threshold}


@dataclass
class Figure:
    """One row of the table: ``value`` (the thing under test) against ``baseline`` (what it is compared with),
    both measured in the same run. ``ratio`` is always value / baseline."""

    key: str  # "rollout/sampled/n128": the JSON key
    label: str  # the table's first column
    unit: str  # of value and baseline
    value: float
    baseline: float
    baseline_name: str  # what the baseline is, in a few words
    targets: list[Target] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # every number the two sides were computed from

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    def ratio_target(self, op: str, threshold: float) -> Figure:
        self.targets.append(Target("ratio", self.ratio, op, threshold))
        return self

    def value_target(self, op: str, threshold: float) -> Figure:
        self.targets.append(Target(self.unit, self.value, op, threshold))
        return self

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "targets": [t.to_dict() | {"passed": t.passed} for t in self.targets],
            "raw": self.raw,
        }


def synchronize(device: str) -> None:
    """Wait for queued CUDA work before reading a clock (a no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def fmt(x: float) -> str:
    """A number in 4 significant digits, thousands grouped for large ones."""
    if x != x:  # nan
        return "nan"
    return f"{x:,.0f}" if abs(x) >= 10_000 else f"{x:.4g}"
