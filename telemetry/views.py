"""Views that shape what the SDK aggregates before Prometheus sees it.

Latency histograms get one fixed set of bucket boundaries, in seconds, so that
dashboards and alert rules can rely on the same ``le`` values everywhere.

A histogram is a *latency histogram* when its name matches
``streambus.*latency`` or its unit is ``s``. The SDK gives an instrument one
output stream **per matching view**, so two views that both match
``streambus.produce.latency`` (unit ``s``) would export the same metric twice
— duplicate families, an invalid exposition. The views below therefore
partition the instruments: one view takes every unit-``s`` histogram, and the
name-based views take only units other than ``s`` (empty, one character that is
not ``s``, or two characters and more), so no instrument matches two of them.
"""

from __future__ import annotations

from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

#: Upper bounds, in seconds, of the latency histogram buckets (``+Inf`` is implicit).
#: Floats on purpose: the exporter prints ``le`` with ``str(bound)``, so these
#: read ``1.0``/``5.0``, the way prometheus_client prints its own histograms.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

LATENCY_NAME_PATTERN = "streambus.*latency"
LATENCY_UNIT = "s"

# fnmatch patterns covering every unit except exactly "s" (see module docstring).
_UNITS_OTHER_THAN_SECONDS = ("", "[!s]", "??*")


def latency_views() -> list[View]:
    """The views giving every latency histogram :data:`LATENCY_BUCKETS`."""
    aggregation = ExplicitBucketHistogramAggregation(boundaries=LATENCY_BUCKETS)
    views = [
        View(
            instrument_type=Histogram,
            instrument_unit=LATENCY_UNIT,
            aggregation=aggregation,
        )
    ]
    views.extend(
        View(
            instrument_type=Histogram,
            instrument_name=LATENCY_NAME_PATTERN,
            instrument_unit=unit_pattern,
            aggregation=aggregation,
        )
        for unit_pattern in _UNITS_OTHER_THAN_SECONDS
    )
    return views
