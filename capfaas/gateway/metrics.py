"""Prometheus metrics with OpenFaaS's names, plus capfaas's own: counters, gauges, histograms."""
from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    """A label value as Prometheus's text format writes it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _key(labels: dict[str, str]) -> Labels:
    """Labels in a fixed order (one label needs no sorting: the hot path's usual case)."""
    return tuple(labels.items()) if len(labels) < 2 else tuple(sorted(labels.items()))


class Metrics:
    """Everything ``/metrics`` shows; gauges are read from live state when scraped."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        """Each series a one-element list, so a hot path can hold it and add to it directly."""
        self.histograms: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self.help: dict[str, tuple[str, str]] = {}
        self.gauges: dict[str, Callable[[], dict[Labels, float]]] = {}
        self._meters: dict[str, FunctionMeter] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self.help[name] = (kind, text)

    def counter(self, name: str, **labels: str) -> list[float]:
        """The series of a counter (created at zero): add to its one element."""
        return self.counters[name].setdefault(_key(labels), [0.0])

    def histogram(self, name: str, **labels: str) -> list[float]:
        """The series of a histogram (created empty), for ``record``."""
        return self.histograms[name].setdefault(_key(labels), [0.0] * (len(BUCKETS) + 2))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.counter(name, **labels)[0] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        record(self.histogram(name, **labels), value)

    def meter(self, function: str) -> FunctionMeter:
        """The series ``function``'s invocations update, looked up once."""
        meter = self._meters.get(function)
        if meter is None:
            meter = self._meters[function] = FunctionMeter(self, function)
        return meter

    def gauge(self, name: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []

        def header(name: str) -> None:
            kind, text = self.help.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        for name, series in sorted(self.counters.items()):
            header(name)
            lines.extend(f"{name}{_labels(k)} {v[0]:g}" for k, v in sorted(series.items()))
        for name, read in sorted(self.gauges.items()):
            header(name)
            lines.extend(f"{name}{_labels(k)} {v:g}" for k, v in sorted(read().items()))
        for name, series in sorted(self.histograms.items()):
            header(name)
            for key, counts in sorted(series.items()):
                running = 0.0
                for bound, count in zip((*BUCKETS, float("inf")), counts):
                    running += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{name}_bucket{_labels((*key, ('le', le)))} {running:g}")
                lines.append(f"{name}_sum{_labels(key)} {counts[-1]:g}")
                lines.append(f"{name}_count{_labels(key)} {running:g}")
        shown = {*self.counters, *self.gauges, *self.histograms}
        for name in sorted(set(self.help) - shown):  # described but not yet seen: the name is still there
            header(name)
        return "\n".join(lines) + "\n"


def gateway_metrics() -> Metrics:
    metrics = Metrics()
    for name, kind, text in (
        ("gateway_function_invocation_total", "counter", "Invocations by function and status code"),
        ("gateway_function_invocation_started", "counter", "Invocations started by function"),
        ("gateway_functions_seconds", "histogram", "Invocation duration by function and status code"),
        ("gateway_service_count", "gauge", "Instances (replicas) per function"),
        ("capfaas_cold_starts_total", "counter", "cVMs started to serve a request"),
        ("capfaas_start_seconds", "histogram", "Time to start a cVM for a request"),
        ("capfaas_instances", "gauge", "cVMs per function and state"),
        ("capfaas_capability_faults_total", "counter", "cVMs stopped for breaking a capability rule"),
        ("capfaas_payload_bytes_total", "counter", "Request and response body bytes by function and direction"),
        ("capfaas_gateway_dedicated_cpu", "gauge", "1 while the gateway's event loop has a CPU to itself"),
    ):
        metrics.describe(name, kind, text)
    return metrics


def record(series: list[float], value: float) -> None:
    """One observation into a histogram's series: its bucket's count, and the sum."""
    series[bisect.bisect_left(BUCKETS, value)] += 1
    series[-1] += value


class FunctionMeter:
    """One function's invocation series, held so that an invocation adds to them without
    building label keys (five updates per request)."""

    def __init__(self, metrics: Metrics, function: str) -> None:
        self._metrics = metrics
        self.function = function
        self.started = metrics.counter("gateway_function_invocation_started", function_name=function)
        self.bytes_in = metrics.counter("capfaas_payload_bytes_total", function_name=function, direction="in")
        self.bytes_out = metrics.counter("capfaas_payload_bytes_total", function_name=function, direction="out")
        self._finished: dict[str, tuple[list[float], list[float]]] = {}

    def finished(self, code: str, seconds: float, sent: int) -> None:
        """An invocation answered with status ``code`` after ``seconds``, sending ``sent`` bytes."""
        series = self._finished.get(code)
        if series is None:
            series = self._finished[code] = (
                self._metrics.counter("gateway_function_invocation_total", function_name=self.function, code=code),
                self._metrics.histogram("gateway_functions_seconds", function_name=self.function, code=code))
        series[0][0] += 1
        record(series[1], seconds)
        self.bytes_out[0] += sent
