"""The models of the liveness detectors besides the keepalive: [tunnel.bfd] and [tunnel.dampening] (spec.md,
"Added 2026-12-06"). Their engines live in greupd/liveness/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    model_validator,
)

from greupd.config.fields import (
    DURATION_TEXT,
    FieldProblem,
    absolute_path,
    format_duration,
    parse_duration,
    whole_number,
)
from greupd.config.keyfiles import secret_file_problem

BFD_KEY_MAX = 20  # a keyed SHA1 key is at most 20 bytes (RFC 5880 4.4)


def seconds_between(what: str, low: float, high: float) -> Callable[[object], float]:
    def check(value: object) -> float:
        seconds = parse_duration(value)
        if not low <= seconds <= high:  # also false for nan
            raise ValueError(f"{what} must be {format_duration(low)}..{format_duration(high)}, not {value!r}")
        return seconds
    return check


def _schema(low: float, high: float) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "number", "minimum": low, "maximum": high}, DURATION_TEXT]})


BfdInterval = Annotated[float, BeforeValidator(seconds_between("interval", 0.05, 60.0)), _schema(0.05, 60.0)]
HalfLife = Annotated[float, BeforeValidator(seconds_between("half_life", 1.0, 3600.0)), _schema(1.0, 3600.0)]
MaxHold = Annotated[float, BeforeValidator(seconds_between("max_hold", 1.0, 86400.0)), _schema(1.0, 86400.0)]
KeepaliveHold = Annotated[float, BeforeValidator(seconds_between("hold", 0.1, 3600.0)), _schema(0.1, 3600.0)]


def read_bfd_key(path: Path) -> bytes:
    """The key in an auth_file: its bytes without the line end an editor adds."""
    return path.read_bytes().rstrip(b"\r\n")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BfdConfig(_Model):
    """RFC 5880/5881 single-hop BFD between the tunnel's `address` and `peer`, through the tunnel."""

    # Both our DesiredMinTx and RequiredMinRx. 50 ms is the least a Python asyncio loop holds with margin.
    interval: BfdInterval = 0.3
    multiplier: Annotated[StrictInt, Field(ge=1, le=255), BeforeValidator(whole_number("multiplier", 1, 255))] = 3
    passive: StrictBool = False
    auth_file: Annotated[Path | None, BeforeValidator(lambda v: v if v is None else absolute_path(
        "/etc/greupd/bfd/My_Tunnel")(v)), WithJsonSchema({"type": "string"})] = None

    @model_validator(mode="after")
    def _key_usable(self) -> BfdConfig:
        if self.auth_file is not None:
            problem = secret_file_problem(self.auth_file)
            if problem is None and len(read_bfd_key(self.auth_file)) > BFD_KEY_MAX:
                problem = (f"{self.auth_file} holds more than {BFD_KEY_MAX} bytes: a keyed SHA1 key is 1 to"
                           f" {BFD_KEY_MAX} bytes (RFC 5880 4.4)")
            if problem is not None:
                raise FieldProblem("auth_file", problem)
        return self


class DampeningConfig(_Model):
    """RFC 2439-style flap dampening of the tunnel's verdict: 1000 penalty per flap, halved every half_life."""

    half_life: HalfLife = 60.0
    suppress: Annotated[StrictInt, Field(ge=1, le=100_000), BeforeValidator(whole_number("suppress", 1, 100_000))] \
        = 2000
    reuse: Annotated[StrictInt, Field(ge=1, le=100_000), BeforeValidator(whole_number("reuse", 1, 100_000))] = 750
    max_hold: MaxHold = 600.0

    @model_validator(mode="after")
    def _can_suppress_and_release(self) -> DampeningConfig:
        if self.reuse >= self.suppress:
            raise FieldProblem("reuse", f"reuse ({self.reuse}) must be below suppress ({self.suppress}): a held"
                                        " tunnel is released when its penalty falls below reuse")
        ceiling = self.reuse * 2 ** (self.max_hold / self.half_life)
        if ceiling <= self.suppress:
            raise FieldProblem("max_hold", f"with max_hold {format_duration(self.max_hold)} and half_life"
                                           f" {format_duration(self.half_life)} the penalty never exceeds"
                                           f" {ceiling:.0f}, so suppress {self.suppress} is never reached:"
                                           " make max_hold longer or suppress lower")
        return self
