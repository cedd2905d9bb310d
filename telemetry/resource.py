"""The OpenTelemetry resource describing this broker process."""

from __future__ import annotations

from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    OTELResourceDetector,
    Resource,
)


def build_resource(service_name: str, broker_id: str) -> Resource:
    """``Resource.create`` with StreamBus defaults that the environment may override.

    ``Resource.create(attributes)`` lets the *passed* attributes win over
    ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES``, the wrong way round for
    defaults, so a default is passed only for keys the environment leaves
    unset. (Passing ``service.instance.id`` is needed in any case: SDK 1.45
    otherwise fills it with a random UUID per process.)
    """
    from_env = OTELResourceDetector().detect().attributes
    defaults = {SERVICE_NAME: service_name, SERVICE_INSTANCE_ID: broker_id}
    return Resource.create({key: value for key, value in defaults.items() if key not in from_env})
