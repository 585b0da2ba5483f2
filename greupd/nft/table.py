"""greupd's nftables table in the kernel: applied as one libnftables transaction, compared, and located on error.

The ruleset itself is rendered purely in render.py; this is the shell that talks to libnftables (its JSON
API, through the `nftables` Python bindings, imported lazily so that a config without MSS clamp or NAT never
needs them).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable, Sequence
from typing import Any

from greupd.nft.delta import delta_commands
from greupd.nft.render import (
    FAMILY,
    MAX_COMMENT,
    Json,
    JsonObject,
    NamedSet,
    Ruleset,
    add_commands,
    clear_commands,
    table_objects,
)


class NftError(Exception):
    """nftables refused or could not be reached; names the tunnel and rule where that is known."""

    def __init__(self, message: str, tunnel: str | None = None, rule: str | None = None) -> None:
        self.message = message
        self.tunnel = tunnel
        self.rule = rule
        where = f" (tunnel {tunnel}: {rule})" if tunnel and rule else f" ({rule})" if rule else ""
        super().__init__(f"{message}{where}")


# --- comparing what the kernel holds with what we would install ------------------------------------------


def normalize_listing(objects: Iterable[Json]) -> str:
    """A canonical text of table/chain/set/map/rule objects, for equality: handles dropped, chains and sets by
    name.

    Rule order inside a chain matters and is kept; the order of chains and sets does not, nor the order of a
    set's elements (the kernel lists them in its hash order).
    """
    table: Json = None
    chains: dict[str, Json] = {}
    sets: dict[str, Json] = {}
    rules: dict[str, list[Json]] = {}
    other: list[Json] = []
    for obj in objects:
        if not isinstance(obj, dict) or len(obj) != 1:
            other.append(obj)
            continue
        ((kind, body),) = obj.items()
        if kind == "metainfo":
            continue
        if not isinstance(body, dict):
            other.append(obj)
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "table":
            table = body
        elif kind == "chain":
            chains[str(body.get("name"))] = body
        elif kind in ("set", "map"):
            elements = body.get("elem")
            if isinstance(elements, list):
                body["elem"] = sorted(elements, key=lambda e: json.dumps(e, sort_keys=True))
            sets[f"{kind} {body.get('name')}"] = body
        elif kind == "rule":
            rules.setdefault(str(body.get("chain")), []).append(body)
        else:
            other.append({kind: body})  # counters, quotas, flowtables: we make none, so any is a difference
    return json.dumps({"table": table, "chains": chains, "sets": sets, "rules": rules, "other": other},
                      sort_keys=True)


# --- the kernel side --------------------------------------------------------------------------------------


def _clean_error(text: str) -> str:
    # libnftables prefixes JSON input errors with a location it does not have ("internal:0:0-0: ").
    lines = [line.removeprefix("internal:0:0-0: ").strip() for line in text.splitlines()]
    return "; ".join(line for line in lines if line) or "libnftables failed without a message"


class NftTable:
    """greupd's table in the kernel of the calling process's netns, through libnftables."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._nft: Any = None  # nftables.Nftables, created on first use (the bindings are optional)
        # The listing the kernel gave right after our last apply. A newer libnftables may print some
        # expression differently from how we render it; recognising our own last apply keeps that from
        # looking like drift (which would re-apply on every event it causes: a loop).
        self._applied: tuple[Ruleset, str] | None = None
        # What the last matches() saw. When it is what our last apply left, the next apply may send only the
        # difference (delta.py: a tunnel added is a few element adds, not 1000 tunnels' worth of table).
        self._seen: str | None = None

    # libnftables --------------------------------------------------------------------------------------

    def _context(self) -> Any:
        if self._nft is None:
            try:
                import nftables
            except ImportError as exc:
                raise NftError("the libnftables Python bindings are missing (pip install pip-nftables;"
                               " Debian: python3-nftables)") from exc
            try:
                self._nft = nftables.Nftables()
            except OSError as exc:
                raise NftError(f"libnftables is missing (Debian: apt install libnftables1): {exc}") from exc
        return self._nft

    def _run(self, commands: Sequence[JsonObject]) -> list[Json]:
        # libnftables 1.0.6 calls exit() on a comment that overflows its 256-byte buffer (review round 3, H1):
        # render.py bounds every comment; this is the last line, where the daemon's life is at stake.
        if (longest := _longest_comment(commands)) > MAX_COMMENT:
            raise NftError(f"refused to send a comment of {longest} characters (at most {MAX_COMMENT}): libnftables"
                           " would end the process")
        try:
            rc, output, error = self._context().json_cmd({"nftables": list(commands)})
        except ValueError as exc:
            # libnftables 1.0.6 lists a table another process owns (`flags owner`) with a `# progname` comment
            # in its JSON, which the bindings cannot parse: seen in a netns, and not a reason to end the daemon.
            raise NftError(f"libnftables answered something that is not JSON: {exc}") from None
        if rc != 0:
            raise NftError(_clean_error(str(error)))
        if isinstance(output, dict) and isinstance(output.get("nftables"), list):
            listing: list[Json] = output["nftables"]
            return listing
        return []

    # reading ------------------------------------------------------------------------------------------

    def present(self) -> bool:
        """Does the kernel have our table? False, without error, when libnftables is not installed."""
        try:
            self._context()
        except NftError:
            return False  # without libnftables nothing of ours can be there to see
        tables = self._run([{"list": {"tables": {"family": FAMILY}}}])
        wanted: Json = {"family": FAMILY, "name": self.table}
        for obj in tables:
            table = obj.get("table") if isinstance(obj, dict) else None
            if isinstance(table, dict) and {k: table.get(k) for k in ("family", "name")} == wanted:
                return True
        return False

    def query(self, command: JsonObject) -> list[Json]:
        """The objects one `list` command returns (any table: nft/foreign.py reads other tables' chains)."""
        self._context()
        return [obj for obj in self._run([command]) if not (isinstance(obj, dict) and "metainfo" in obj)]

    def observe(self) -> str | None:
        """The normalized listing of our table, or None when it does not exist."""
        if not self.present():
            return None
        return normalize_listing(self._run([{"list": {"table": {"family": FAMILY, "name": self.table}}}]))

    def matches(self, ruleset: Ruleset) -> bool:
        """Is what the kernel holds now exactly what `apply(ruleset)` would install?"""
        self._check_name(ruleset)
        if not ruleset.wanted:
            return not self.present()
        seen = self._seen = self.observe()
        if seen is None:
            return False
        if seen == normalize_listing(ruleset.objects()):
            return True
        return self._applied is not None and self._applied == (ruleset, seen)

    def holds(self, ruleset: Ruleset) -> bool:
        """Does the kernel list exactly what `ruleset` renders? Strict: no allowance for how another libnftables
        prints our own apply (that is `matches`); for the IPsec drops, whose presence a tunnel waits for."""
        self._check_name(ruleset)
        if not ruleset.wanted:
            return not self.present()
        seen = self._seen = self.observe()
        return seen is not None and seen == normalize_listing(ruleset.objects())

    # writing ------------------------------------------------------------------------------------------

    def apply(self, ruleset: Ruleset) -> None:
        """Make our table `ruleset` in one transaction (or remove it when nothing is wanted).

        The transaction replaces the whole table, unless the matches() just before saw the kernel holding what
        our last apply left and only tunnels came or went: then it changes just their elements and chains.
        """
        self._check_name(ruleset)
        if not ruleset.wanted:
            self.remove()
            return
        self._context()  # missing libnftables is its own error, not a refused rule
        unchanged = self._applied is not None and self._seen is not None and self._seen == self._applied[1]
        delta = delta_commands(self._applied[0], ruleset) if unchanged and self._applied else None
        self._seen = None
        try:
            if delta is None:
                self._run(ruleset.commands())
            elif delta:
                try:
                    self._run(delta)
                except NftError:
                    self._run(ruleset.commands())  # the kernel held something else after all: replace it
        except NftError as exc:
            raise self._locate(ruleset, exc) from None
        seen = self.observe()
        self._applied = (ruleset, seen) if seen is not None else None

    def remove(self) -> None:
        """Delete our table if it exists; other tables are not touched."""
        self._applied = self._seen = None
        if self.present():
            self._run(clear_commands(self.table))

    def _check_name(self, ruleset: Ruleset) -> None:
        if ruleset.table != self.table:
            raise ValueError(f"ruleset for table {ruleset.table!r} given to NftTable({self.table!r})")

    def _locate(self, ruleset: Ruleset, error: NftError) -> NftError:
        """Find what the kernel refused, checking the table with one rule at a time in a dry run.

        libnftables reports JSON input errors without a position, and the batch was rolled back whole;
        a dry run sends the same batch for the kernel to validate, then aborts it.
        """
        empty = [NamedSet(s.name, s.key, s.verdicts, ()) for s in ruleset.sets]
        base = [*clear_commands(ruleset.table),
                *add_commands(table_objects(ruleset.table, ruleset.chains, (), empty))]
        skeleton = f"table {FAMILY} {ruleset.table} and its chains, sets and maps"
        candidates: list[tuple[str | None, str, list[JsonObject]]] = [(None, skeleton, base)]
        for named in ruleset.sets:
            for element in named.elements:
                add: JsonObject = {"element": {"family": FAMILY, "table": ruleset.table, "name": named.name,
                                               "elem": [element.json]}}
                candidates.append((element.tunnel, f"{named.kind} {named.name}: {element.text}",
                                   [*base, {"add": add}]))
        for rule in ruleset.rules:
            (obj,) = table_objects(ruleset.table, (), (rule,))[1:]
            candidates.append((rule.tunnel, f"chain {rule.chain}: {rule.text}", [*base, {"add": obj}]))
        for tunnel, what, commands in candidates:
            try:
                if not self._check(commands):
                    return error  # no dry run in this libnftables: the kernel's message is all we have
            except NftError as exc:
                return NftError(exc.message, tunnel=tunnel, rule=what)
        return error

    def _check(self, commands: Sequence[JsonObject]) -> bool:
        """Validate commands against the kernel without committing; False if dry runs are unavailable."""
        nft = self._context()
        if not _set_dry_run(nft, True):
            return False
        try:
            self._run(commands)
        finally:
            _set_dry_run(nft, False)
        return True


def _longest_comment(value: object) -> int:
    """The longest "comment" string anywhere in a JSON command list (rules and set elements carry them)."""
    if isinstance(value, dict):
        own = value.get("comment")
        return max([len(own) if isinstance(own, str) else 0, *(_longest_comment(v) for v in value.values())])
    if isinstance(value, list):
        return max((_longest_comment(v) for v in value), default=0)
    return 0


def _set_dry_run(nft: Any, on: bool) -> bool:
    """Switch libnftables' check mode (the batch goes to the kernel, which validates it and aborts).

    Newer bindings have `set_dry_run`; pip-nftables 1.0.2 does not, so call the C library directly.
    """
    setter = getattr(nft, "set_dry_run", None)
    if setter is not None:
        setter(on)
        return True
    context = getattr(nft, "_Nftables__ctx", None)
    if context is None:
        return False
    try:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_ctx_set_dry_run(context, on)
    except (OSError, AttributeError):
        return False
    return True
