"""The daemon's errors, each with the HTTP status the API answers it with."""

from __future__ import annotations

from pyvirt.errors import PyvirtError


class HostError(PyvirtError):
    status = 400


class NotFound(HostError):
    status = 404


class Conflict(HostError):
    status = 409


class Invalid(HostError):
    status = 422
