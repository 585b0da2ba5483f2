"""greupd's nftables table in the kernel: applied as one libnftables transaction, compared, and located on error.

The ruleset itself is rendered purely in render.py; this is the shell that talks to libnftables (its JSON
API, through the `nftables` Python bindings, imported lazily so that a config without MSS clamp or NAT never
needs them).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from greupd.nft.delta import delta_commands
from greupd.nft.fingerprint import FingerprintError, NftNetlink
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


@dataclass(frozen=True)
class _Verified:
    """The kernel was seen holding `ruleset`'s table when nftables was at `generation` and the table's bytes
    hashed to `digest` (fingerprint.py; None: no table)."""

    ruleset: Ruleset
    generation: int
    digest: bytes | None
    strict: bool  # by the listing being the rendering itself (holds()), not only our last apply (matches())


class NftTable:
    """greupd's table in the kernel of the calling process's netns, through libnftables.

    Reading the table back through libnftables costs about a second per 1000 tunnels, so a comparison that
    found the kernel holding a ruleset (or an apply of one) is remembered with a fingerprint (fingerprint.py:
    the ruleset generation, then a digest of the table's bytes), and the next comparison with the same ruleset
    is that fingerprint: microseconds while no transaction happened at all, a dump of our table when another
    one did. Only a different digest (someone changed our table) goes back to libnftables.
    """

    def __init__(self, table: str, netlink: NftNetlink | None = None) -> None:
        self.table = table
        self._nft: Any = None  # nftables.Nftables, created on first use (the bindings are optional)
        self.netlink = netlink or NftNetlink()  # the keeper's two tables share one (and its chain dump)
        # The listing the kernel gave right after our last apply (None when the fingerprint stood in for it). A
        # newer libnftables may print some expression differently from how we render it; recognising our own
        # last apply keeps that from looking like drift (which would re-apply on every event it causes: a loop).
        self._applied: tuple[Ruleset, str | None] | None = None
        # Whether the last matches() saw the kernel holding exactly what our last apply left: then the next apply
        # may send only the difference (delta.py: a tunnel added is a few element adds, not 1000 tunnels' worth).
        self._at_applied = False
        self._verified: _Verified | None = None
        self._normalized: tuple[Ruleset, str] | None = None  # our side of the comparison, for the last ruleset

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
        return self._listing() is not None

    def _listing(self) -> list[Json] | None:
        """Our table as listed, or None when there is none. Asked by name, not by listing every table: another
        process's owned table can list as unparsable JSON (libnftables 1.0.6, see _run), and is none of ours."""
        try:
            return self._run([{"list": {"table": {"family": FAMILY, "name": self.table}}}])
        except NftError as exc:
            if str(exc) == "Error: No such file or directory":
                return None
            raise

    def query(self, command: JsonObject) -> list[Json]:
        """The objects one `list` command returns (any table: nft/foreign.py reads other tables' chains)."""
        self._context()
        return [obj for obj in self._run([command]) if not (isinstance(obj, dict) and "metainfo" in obj)]

    def observe(self) -> str | None:
        """The normalized listing of our table, or None when it does not exist."""
        try:
            self._context()
        except NftError:
            return None  # as present(): without libnftables there is no table of ours
        listing = self._listing()
        return None if listing is None else normalize_listing(listing)

    def matches(self, ruleset: Ruleset) -> bool:
        """Is what the kernel holds now exactly what `apply(ruleset)` would install?"""
        return self._compare(ruleset, strict=False)

    def holds(self, ruleset: Ruleset) -> bool:
        """Does the kernel list exactly what `ruleset` renders? Strict: no allowance for how another libnftables
        prints our own apply (that is `matches`); for the IPsec drops, whose presence a tunnel waits for."""
        return self._compare(ruleset, strict=True)

    def _compare(self, ruleset: Ruleset, strict: bool) -> bool:
        self._check_name(ruleset)
        verified = self._verified
        still = self._still(verified) if verified is not None else None
        if verified is not None and still:
            same = verified.ruleset is ruleset or verified.ruleset == ruleset
            if same and (verified.strict or not strict):
                return True
            # The kernel holds what we verified last: if that is our last apply, a delta takes it to `ruleset`.
            self._at_applied = self._applied is not None and self._applied[0] == verified.ruleset
            if not same:
                return False
        elif still is False and not strict and verified is not None and verified.ruleset == ruleset:
            # Someone changed our table since it was verified (its digest moved): put it back as a whole, without
            # reading thousands of tunnels back first only to learn how it differs.
            self._at_applied = False
            return False
        before = self._fingerprint()
        self._at_applied = False
        if not ruleset.wanted:
            listed = result = not self.present()
        else:
            seen = self.observe()
            listed = seen is not None and seen == self._normalize(ruleset)
            ours = self._applied is not None and self._applied[1] is not None and seen == self._applied[1]
            self._at_applied = ours
            result = listed or (not strict and ours and self._applied is not None and self._applied[0] == ruleset)
        if result and before is not None:
            self._remember(ruleset, before, strict=listed)
        return result

    def _fingerprint(self) -> tuple[int, bytes | None] | None:
        """(generation, digest) of one moment: None if a transaction came in between, or nf_tables' netlink
        cannot be asked (then every comparison goes through libnftables)."""
        try:
            generation = self.netlink.generation()
            digest = self.netlink.table_digest(self.table)
            return (generation, digest) if self.netlink.generation() == generation else None
        except FingerprintError:
            return None

    def _generation(self) -> int | None:
        try:
            return self.netlink.generation()
        except FingerprintError:
            return None

    def _still(self, verified: _Verified) -> bool | None:
        """Does the kernel still hold the table as it was verified? Never a false yes (fingerprint.py); None when
        nf_tables' netlink cannot say."""
        try:
            generation = self.netlink.generation()
            if generation == verified.generation:
                return True
            digest = self.netlink.table_digest(self.table)
        except FingerprintError:
            return None
        if digest != verified.digest:
            return False
        self._verified = replace(verified, generation=generation)
        return True

    def _remember(self, ruleset: Ruleset, before: tuple[int, bytes | None], strict: bool) -> None:
        """Keep the fingerprint taken before a comparison that found `ruleset`, unless a transaction came
        between the two (then the next comparison is a full one again)."""
        try:
            if self.netlink.generation() != before[0]:
                return
        except FingerprintError:
            return
        self._verified = _Verified(ruleset, before[0], before[1], strict)

    def _normalize(self, ruleset: Ruleset) -> str:
        if self._normalized is None or self._normalized[0] is not ruleset:
            self._normalized = (ruleset, normalize_listing(ruleset.objects()))
        return self._normalized[1]

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
        delta = delta_commands(self._applied[0], ruleset) if self._at_applied and self._applied else None
        self._at_applied, self._verified = False, None
        generation = self._generation()
        if generation is not None and delta != []:  # an empty delta sends nothing: no commit
            generation = next_generation(generation)
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
        # The transaction committed whole: the kernel holds `ruleset`. Its fingerprint stands for it (no listing
        # of thousands of tunnels back), unless nf_tables' netlink cannot be asked: then the listing it is.
        after = self._fingerprint()
        # Our commit, and nobody else's since: the generation moved by one (or not at all for an empty delta).
        if after is not None and after[0] == generation:
            self._applied = (ruleset, None)
            self._verified = _Verified(ruleset, after[0], after[1], strict=False)
            return
        seen = self.observe()
        self._applied = (ruleset, seen) if seen is not None else None

    def remove(self) -> None:
        """Delete our table if it exists; other tables are not touched."""
        self._applied = self._verified = None
        self._at_applied = False
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


def next_generation(generation: int) -> int:
    """The generation after one commit: the kernel adds one to a 32-bit counter and skips 0 (nf_tables_commit)."""
    return (generation + 1) & 0xFFFFFFFF or 1


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
