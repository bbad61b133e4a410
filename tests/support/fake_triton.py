"""A stand-in for pb_utils' MetricFamily that behaves as the Python backend of tritonserver 2.51
does (tests/e2e/test_scale_out_metrics.py checks the real one): families of one name share one
metric on the page; a family keeps every Metric it made until it is deleted, and deleting it
deletes their series; a Metric whose family was deleted raises. Every Metric call is a round trip
to the server process there, so the stand-in counts them."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class FakeTriton:
    """What tritonserver's metrics page holds, and the pb_utils module that feeds it."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, tuple], float] = {}  # (name, sorted labels) -> value
        self.kinds: dict[str, str] = {}
        self.calls = 0
        self.families_alive = 0
        self.MetricFamily = self._family_class()

    def _family_class(self) -> type:
        server = self

        class Metric:
            def __init__(self, name: str, labels: dict[str, str]) -> None:
                self.key = (name, tuple(sorted(labels.items())))  # no reference back to the family, as in C++
                self.cleared = False
                server.series[self.key] = 0.0

            def _call(self) -> None:
                if self.cleared:
                    raise RuntimeError("Invalid metric operation as the corresponding 'MetricFamily' has been deleted")
                server.calls += 1

            def increment(self, value: float) -> None:
                self._call()
                server.series[self.key] += value

            def set(self, value: float) -> None:
                self._call()
                server.series[self.key] = value

            def observe(self, value: float) -> None:
                self._call()
                server.series[self.key] += 1  # the count: enough for these tests

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name: str, description: str, kind: str) -> None:
                assert server.kinds.setdefault(name, kind) == kind, "one name, one kind"
                self.name, self._metrics = name, []
                server.calls += 1
                server.families_alive += 1

            def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Metric:
                assert (buckets is not None) == (server.kinds[self.name] == self.HISTOGRAM)
                server.calls += 1
                metric = Metric(self.name, labels)
                self._metrics.append(metric)  # kept until the family goes, as python_backend does
                return metric

            def __del__(self) -> None:
                for metric in self._metrics:
                    metric.cleared = True
                    server.series.pop(metric.key, None)
                server.families_alive -= 1

        return MetricFamily

    def page(self) -> str:
        """The text exposition format, as tritonserver's /metrics writes it."""
        lines = []
        for name in sorted({name for name, _ in self.series}):
            lines += [f"# HELP {name} {name}", f"# TYPE {name} {self.kinds[name]}"]
            for (series_name, labels), value in self.series.items():
                if series_name == name:
                    label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                    suffix = "_count" if self.kinds[name] == "histogram" else ""
                    lines.append(f"{name}{suffix}{{{label_text}}} {value}")
        return "\n".join(lines) + "\n"

    def samples(self) -> dict[tuple[str, frozenset], float]:
        """The page parsed back by prometheus_client: (sample name, labels) -> value."""
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(self.page()) for s in family.samples}
