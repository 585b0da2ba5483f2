"""[tunnel.mtu_probe]: how a tunnel with mtu = "probe" measures its path (issue #23, greupd/keepalive/pmtu.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, StrictInt, WithJsonSchema

from greupd.config.detectors import _Model  # the one frozen, extra="forbid" base of the tunnel's sub-tables
from greupd.config.fields import DURATION_TEXT, parse_duration, whole_number


def _mtu_probe_every(value: object) -> float:
    seconds = parse_duration(value)
    if not 10 <= seconds <= 86400:  # also false for nan
        raise ValueError(f"every must be 10..86400 seconds (\"10s\"..\"24h\"), not {value!r}")
    return seconds


def _mtu_probe_timeout(value: object) -> float:
    seconds = parse_duration(value)
    if not 0.05 <= seconds <= 10:  # also false for nan
        raise ValueError(f"timeout must be 0.05..10 seconds (\"50ms\"..\"10s\"), not {value!r}")
    return seconds


class MtuProbeConfig(_Model):
    """With mtu = "probe": how the tunnel's path MTU is measured (greupd/keepalive/pmtu.py)."""

    every: Annotated[float, BeforeValidator(_mtu_probe_every), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 10, "maximum": 86400}, DURATION_TEXT]})] = 600.0
    # A probe not back by then is lost (three lost make a size fail): the round trip's worst, with room.
    timeout: Annotated[float, BeforeValidator(_mtu_probe_timeout), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0.05, "maximum": 10}, DURATION_TEXT]})] = 1.0
    # RFC 8899's BASE_PLPMTU: the link's MTU is never set below it; a path that cannot carry it is reported.
    floor: Annotated[StrictInt, Field(ge=576, le=65535), BeforeValidator(whole_number("floor", 576, 65535))] = 1200
