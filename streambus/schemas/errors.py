"""The registry's errors: Confluent's REST error codes, under StreamBus's one error root.

Each class carries the HTTP status and Confluent's ``error_code`` (the body is
``{"error_code": ..., "message": ...}``), so the REST layer answers from the
exception alone and every client of Confluent's API reads the same codes.
"""

from __future__ import annotations

from typing import ClassVar

from streambus.errors import StreamBusError


class SchemaRegistryError(StreamBusError):
    http_status: ClassVar[int] = 500
    error_code: ClassVar[int] = 50001
    description = "Error in the backend data store"


class SubjectNotFoundError(SchemaRegistryError):
    http_status = 404
    error_code = 40401
    description = "Subject not found."


class VersionNotFoundError(SchemaRegistryError):
    http_status = 404
    error_code = 40402
    description = "Version not found."


class SchemaNotFoundError(SchemaRegistryError):
    http_status = 404
    error_code = 40403
    description = "Schema not found"


class SubjectSoftDeletedError(SchemaRegistryError):
    http_status = 404
    error_code = 40404
    description = "Subject was soft deleted. Set permanent=true to delete permanently"


class SubjectNotSoftDeletedError(SchemaRegistryError):
    http_status = 404
    error_code = 40405
    description = "Subject was not deleted first before being permanently deleted"


class VersionSoftDeletedError(SchemaRegistryError):
    http_status = 404
    error_code = 40406
    description = "Version was soft deleted. Set permanent=true to delete permanently"


class VersionNotSoftDeletedError(SchemaRegistryError):
    http_status = 404
    error_code = 40407
    description = "Version was not deleted first before being permanently deleted"


class SubjectConfigNotFoundError(SchemaRegistryError):
    http_status = 404
    error_code = 40408
    description = "Subject does not have subject-level compatibility configured"


class IncompatibleSchemaError(SchemaRegistryError):
    http_status = 409
    error_code = 409
    description = "Schema being registered is incompatible with an earlier schema"


class InvalidSchemaError(SchemaRegistryError):
    http_status = 422
    error_code = 42201
    description = "Invalid schema"


class InvalidVersionError(SchemaRegistryError):
    http_status = 422
    error_code = 42202
    description = "The specified version is not a valid version id"


class InvalidCompatibilityLevelError(SchemaRegistryError):
    http_status = 422
    error_code = 42203
    description = "Invalid compatibility level"


class InvalidModeError(SchemaRegistryError):
    http_status = 422
    error_code = 42204
    description = "Invalid mode"


class OperationNotPermittedError(SchemaRegistryError):
    http_status = 422
    error_code = 42205
    description = "Operation not permitted"


class UnprocessableEntityError(SchemaRegistryError):
    """A body that is not the JSON the endpoint takes (Confluent answers plain 422)."""

    http_status = 422
    error_code = 422
    description = "Unrecognized field or malformed JSON"


class StoreError(SchemaRegistryError):
    http_status = 500
    error_code = 50001
    description = "Error in the backend data store"


class StoreTimeoutError(SchemaRegistryError):
    http_status = 500
    error_code = 50002
    description = "Operation timed out"


class ForwardingError(SchemaRegistryError):
    http_status = 500
    error_code = 50003
    description = "Error while forwarding the request to the primary"


class UnknownLeaderError(SchemaRegistryError):
    http_status = 500
    error_code = 50004
    description = "Unknown primary: no broker leads _schemas"


class UnauthorizedError(SchemaRegistryError):
    http_status = 401
    error_code = 40101
    description = "Unauthorized: missing or invalid credentials"


class ForbiddenError(SchemaRegistryError):
    http_status = 403
    error_code = 40301
    description = "User is denied operation on the resource"


class RemoteFetchError(StreamBusError):
    """The ``_schemas`` leader answered a non-replica's fetch with an error (retried)."""
