"""Quantities with units, as written in specs (``3.3G``, ``16M``, ``70%``) and on the command line
(``3.3GFLOPs``, ``16Mparams``, ``70%``). Pure Python; used by the checker and the CLI.

"FLOPs" follow the ViT-pruning literature: they are multiply-adds (MACs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..lang.errors import did_you_mean

SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
FLOPS_UNITS = {p + s: SCALE[p] for p in SCALE for s in ("", "FLOPs", "MACs")} | {"%": 0.01}
PARAMS_UNITS = {p + s: SCALE[p] for p in SCALE for s in ("", "params")} | {"%": 0.01}
LATENCY_UNITS = {"ms": 1.0, "us": 1e-3, "s": 1000.0, "%": 0.01}  # to milliseconds; % of the dense network's
UNITS = {"flops": FLOPS_UNITS, "params": PARAMS_UNITS, "latency": LATENCY_UNITS}
METRICS = ("flops", "params", "latency")


class UnitError(ValueError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Limit:
    """A budget: ``metric <= value`` (absolute MACs / parameters / milliseconds) or ``metric <= fraction`` of the
    dense cost (for latency: of the dense network's latency as the device's table predicts it, resolved when the
    table is read: :meth:`spvit_dsl.compile.program.Program.with_latency`)."""

    metric: str  # "flops" | "params" | "latency"
    value: float  # absolute count, or a fraction in (0, ...) when relative
    relative: bool
    text: str  # as the user wrote it, e.g. "3.3G" or "70%"

    def absolute(self, dense: float) -> float:
        return self.value * dense if self.relative else self.value

    @property
    def unit(self) -> str:
        if self.relative:
            return "%"
        return {"flops": "GMACs", "params": "M", "latency": "ms"}[self.metric]


def to_limit(metric: str, number: float, unit: str, text: str) -> Limit:
    """Interpret ``number`` + ``unit`` for ``metric``; raise :class:`UnitError` for an unknown unit."""
    table = UNITS[metric]
    if metric == "latency" and not unit:
        raise UnitError(
            f"a latency budget needs a unit: '{text}'",
            f"did you mean {text}ms? (units: ms, us, s, or % of the dense network)",
        )
    if unit not in table:
        close = did_you_mean(unit, [u for u in table if u])
        raise UnitError(
            f"unknown unit '{unit}' for {metric} in '{text}'",
            close if close.startswith("did you mean") else _units_hint(metric),
        )
    if number <= 0:
        raise UnitError(f"a {metric} budget must be positive, found '{text}'")
    if not unit:  # `flops <= 3.3`: 3.3 multiply-adds is never what was meant
        guess = "G" if metric == "flops" else "M"
        what = "multiply-adds" if metric == "flops" else "parameters"
        raise UnitError(
            f"a {metric} budget needs a unit: '{text}' would be {text} {what}",
            f"did you mean {text}{guess}? (units: K, M, G{', T' if metric == 'flops' else ''} or %)",
        )
    if not math.isfinite(number * table[unit]):
        raise UnitError(f"a {metric} budget must be a finite number, found '{text}'")
    if unit == "%":
        return Limit(metric, number / 100.0, True, text)
    return Limit(metric, number * table[unit], False, text)


def _units_hint(metric: str) -> str:
    return {
        "flops": "write e.g. 3.3G or 70%",
        "params": "write e.g. 16M or 70%",
        "latency": "write e.g. 8ms or 60%",
    }[metric]


_FLAG = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*$")


def parse_budget_flag(text: str) -> Limit:
    """``--budget`` values: ``3.3GFLOPs``, ``3.3G`` (FLOPs), ``16Mparams``, ``70%`` (of dense FLOPs), ``70%params``,
    ``8ms`` (latency), ``60%latency`` (of the dense network's predicted latency)."""
    m = _FLAG.match(text)
    if not m and text.strip().startswith("-"):
        raise UnitError(f"a budget must be positive, found '{text}'")
    if not m:
        raise UnitError(
            f"cannot read budget '{text}'; expected e.g. 3.3GFLOPs, 16Mparams, 70%, 8ms or 60%latency"
        )
    number, unit = float(m.group(1)), m.group(2)
    # the limit keeps its text as a spec writes it (`6 ms` → `6ms`): frozen specs quote it
    if unit in LATENCY_UNITS and unit != "%":
        return to_limit("latency", number, unit, m.group(1) + unit)
    if unit == "%latency":  # the limit's text as a spec writes it: `latency <= 60%`
        return to_limit("latency", number, "%", m.group(1) + "%")
    if not unit:  # "--budget 50": 50% or 50 G? A bare count of 50 multiply-adds is never what was meant
        raise UnitError(
            f"budget '{text}' has no unit; write e.g. {m.group(1)}% (of the dense FLOPs), {m.group(1)}GFLOPs, "
            f"{m.group(1)}Mparams or {m.group(1)}ms"
        )
    # the limit keeps its text as a spec writes it (`16Mparams` → `params <= 16M`): frozen specs quote it
    if unit.endswith("params"):
        unit = "%" if unit == "%params" else unit
        limit = to_limit("params", number, unit, text)
        return Limit(limit.metric, limit.value, limit.relative, m.group(1) + unit.removesuffix("params"))
    if unit not in FLOPS_UNITS:
        raise UnitError(
            f"unknown unit '{unit}' in budget '{text}'; expected e.g. 3.3GFLOPs, 16Mparams, 70%, 8ms or 60%latency"
        )
    limit = to_limit("flops", number, unit, text)
    return Limit(limit.metric, limit.value, limit.relative, m.group(1) + re.sub(r"(FLOPs|MACs)$", "", unit))


def quantity(value: float, digits: int = 6) -> str:
    """A count in the language's unit notation with ``digits`` significant digits and the prefix that puts the
    mantissa in [1, 1000): ``5619880`` → ``5.61988M``, ``4.6e9`` → ``4.6G`` (frozen headers; read back with
    :data:`SCALE`)."""
    prefix = next((p for p in ("T", "G", "M", "K") if abs(value) >= SCALE[p]), "")
    return f"{value / SCALE[prefix]:.{digits}g}{prefix}"


def fmt_macs(macs: float) -> str:
    """G multiply-adds with three decimals; M below 0.1 G so small networks stay readable."""
    return f"{macs / 1e9:.3f} G" if macs >= 1e8 or macs == 0 else f"{macs / 1e6:.3f} M"


def fmt_params(params: float) -> str:
    """Millions of parameters; thousands below 0.1 M."""
    return f"{params / 1e6:.2f} M" if params >= 1e5 or params == 0 else f"{params / 1e3:.1f} K"


def fmt_ms(ms: float) -> str:
    """Milliseconds with three significant digits."""
    return f"{ms:.3g} ms"


def fmt_metric(metric: str, value: float) -> str:
    """A cost in its metric's unit: G/M multiply-adds, M/K parameters, milliseconds."""
    return {"flops": fmt_macs, "params": fmt_params, "latency": fmt_ms}[metric](value)
