"""The lab's pytest plugin: run each kernel-marked test where a kernel offers what it needs.

Loaded by tests/conftest.py (``pytest_plugins = ["lab.pytest_plugin"]``); the markers are declared
in pyproject.toml.

- ``needs_root``: a fresh netns on the running kernel (skips when not root, outside CI).
- ``needs_gre`` / ``needs_systemd`` / ``needs_nft_gre`` / ``needs_systemd_nft``: on the running kernel if it can
  (found by trying, see lab/kernel.py), else delegated to a guest: ``uml``, ``uml-systemd``, ``vng``,
  ``vng-systemd``.

Delegated tests are not skipped: every selected test of a guest kind runs in ONE boot of that guest
(pytest on exactly those node ids), and the host replays each test's reports from the guest so the
summary counts them as if they had run here. Host-side fixtures are never set up for them.

When: the host's own tests run first, the delegated ones after them. The ``uml`` tests are split over
three UML guests and the ``vng`` tests over two qemu ones (SHARDS; balanced by their recorded times, see
balance()); those boot as soon as collection ends, in threads, and run while the host's tests do; the
``uml-systemd`` and ``vng-systemd`` batches boot once the host hands them the .deb when a test that builds it
was selected (make install-test), else at once too (AFTER_HOST_TESTS). GREUPD_LAB_SERIAL=1 boots one guest at a
time instead, each when pytest reaches its first test.

CI rule (CI=true): a kernel-marked test that skips is a failure, and so is a guest that cannot
boot. Inside a guest (GREUPD_LAB_GUEST set) nothing is delegated further.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from _pytest.reports import TestReport

from lab import guest, kernel

_When = Literal["setup", "call", "teardown"]
_Outcome = Literal["passed", "failed", "skipped"]
REPORT_FILE = "report.jsonl"  # in the guest's run dir
_DELEGATE = pytest.StashKey[guest.GuestKind]()
_BATCH = pytest.StashKey[str]()  # the batch (one guest boot) a delegated test runs in: "uml", "uml/2", ...
_RESULTS = pytest.StashKey[dict[str, "_GuestBatch"]]()
_PENDING = pytest.StashKey[dict[str, "_PendingBatch"]]()
_STARTED = pytest.StashKey[float]()  # time.monotonic() when collection ended, for the timeline lines
# Batches that boot only once the host hands them something: the systemd tests (both kinds) install the .deb that
# tests/test_packaging.py builds on the host (handed over in GREUPD_LAB_DEB); without it the guest
# builds one itself, minutes of UML time. Such a batch boots as soon as the variable is set (after the
# host test that sets it), else once the host's tests are done; when no such test was selected, at the start
# like the other batches.
AFTER_HOST_TESTS: dict[guest.GuestKind, str] = {"uml-systemd": "GREUPD_LAB_DEB", "vng-systemd": "GREUPD_LAB_DEB"}
# The host's test files that hand something over run before the host's other tests, so the batch
# waiting for it boots minutes sooner (in a make test at load 20 the .deb came 660 s in, otherwise).
HANDING_OVER = ("test_packaging.py",)
# How many guests share a kind's tests, split by their recorded durations (DURATIONS). Each guest is one chain of
# work on one host CPU (UML's kernel and its processes take turns on one; qemu emulates one vCPU), and both are
# mostly busy, not waiting (the ansible test: 175 CPU s of 527 s at load 12; alone on a quiet machine ~160 s): a
# batch's time is at least its CPU seconds however many cores are free. So no chain may be much longer than the
# whole run's CPU over two cores: three UML guests, two qemu ones (the `vng` batch alone was ~750 s of emulation
# once the ipsec and doctor tests came). A guest more costs its boot and pytest's start-up (UML ~15 CPU s, qemu ~40).
# GREUPD_LAB_<KIND>_SHARDS=N changes it (e.g. GREUPD_LAB_UML_SHARDS=2); GREUPD_LAB_SERIAL=1 means one each.
SHARDS: dict[guest.GuestKind, int] = {"uml": 3, "vng": 2}
# Seconds per delegated test as last measured in its guest (node id -> setup + call + teardown), to
# balance the shards: the checked-in file, overlaid by the one each run writes under .lab/.
DURATIONS = Path(__file__).with_name("durations.json")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _needs(item: pytest.Item) -> tuple[list[str], frozenset[str]]:
    names = [m for m in kernel.MARKERS if item.get_closest_marker(m)]
    return names, frozenset().union(*(kernel.MARKERS[m] for m in names))


# --------------------------------------------------------------------------- deciding


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [(item, *_needs(item)) for item in items]
    marked = [m for m in marked if m[1]]
    if not marked:
        return
    caps = kernel.capabilities()
    here = kernel.current_guest()
    for item, names, needs in marked:
        missing = needs - caps
        if not missing:
            continue
        where = f"the {here} guest" if here else "this kernel"
        kind = None if here or os.geteuid() != 0 else kernel.guest_for(needs)
        if kind is None:
            why = "not root" if os.geteuid() != 0 else f"{where} lacks {', '.join(sorted(missing))}"
            item.add_marker(pytest.mark.skip(reason=f"{'/'.join(names)}: {why}"))
        else:
            item.stash[_DELEGATE] = kind
    # The host's own tests first (those that hand something over to a guest before the rest), then the
    # guests' batch by batch (they run meanwhile, see _start), the batches that boot last at the end.
    # Stable: each file keeps its order.
    late = [k for k in guest.KINDS if k not in AFTER_HOST_TESTS] + sorted(AFTER_HOST_TESTS)
    for kind in late:
        _shard(kind, [i for i in items if i.stash.get(_DELEGATE, None) == kind])
    batches = [_batch_name(k, n) for k in late for n in range(1, _shards(k) + 1)]

    def order(item: pytest.Item) -> int:
        if (batch := item.stash.get(_BATCH, None)) is not None:
            return 2 + batches.index(batch)
        return 0 if item.path.name in HANDING_OVER else 1

    items.sort(key=order)


def _shards(kind: guest.GuestKind) -> int:
    if _serial():
        return 1
    forced = os.environ.get(f"GREUPD_LAB_{kind.upper().replace('-', '_')}_SHARDS", "")
    if forced.isdigit():
        return max(1, int(forced))
    return SHARDS.get(kind, 1)


def _batch_name(kind: guest.GuestKind, shard: int) -> str:
    return f"{kind}/{shard}" if _shards(kind) > 1 else kind


def recorded_durations() -> dict[str, float]:
    """Node id -> seconds the test last took in its guest (checked in, then this checkout's last run)."""
    known: dict[str, float] = {}
    for path in (DURATIONS, guest.lab_dir() / DURATIONS.name):
        with contextlib.suppress(OSError, ValueError):
            known.update(json.loads(path.read_text()))
    return known


def balance(estimates: dict[str, float], shards: int) -> list[list[str]]:
    """Node ids split into `shards` lists of about equal total time: longest first, each onto the
    shard that has the least so far. Each list keeps the order the ids came in."""
    loads = [0.0] * shards
    where: dict[str, int] = {}
    for nodeid in sorted(estimates, key=lambda n: -estimates[n]):
        emptiest = loads.index(min(loads))
        where[nodeid] = emptiest
        loads[emptiest] += estimates[nodeid]
    return [[n for n in estimates if where[n] == shard] for shard in range(shards)]


def estimates(items: list[pytest.Item], known: dict[str, float]) -> dict[str, float]:
    """Node id -> the seconds to expect: as recorded, else (a new test) the median of the batch's recorded
    tests (a new qemu test is slower than a new UML one), else of all recorded, else SECONDS_PER_TEST."""
    ours = sorted(known[i.nodeid] for i in items if i.nodeid in known)
    pool = ours or sorted(known.values())
    typical = pool[len(pool) // 2] if pool else SECONDS_PER_TEST
    return {i.nodeid: known.get(i.nodeid, typical) for i in items}


def _shard(kind: guest.GuestKind, items: list[pytest.Item]) -> None:
    shards = _shards(kind)
    if shards == 1:
        for item in items:
            item.stash[_BATCH] = _batch_name(kind, 1)
        return
    parts = balance(estimates(items, recorded_durations()), shards)
    batch = {nodeid: _batch_name(kind, n) for n, part in enumerate(parts, 1) for nodeid in part}
    for item in items:
        item.stash[_BATCH] = batch[item.nodeid]


# --------------------------------------------------------------------------- CI rule


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, TestReport, TestReport]:
    rep = yield
    if _ci() and rep.skipped and not hasattr(rep, "wasxfail"):
        names, _ = _needs(item)
        if names:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = f"CI=true and this test is marked {', '.join(names)}, so it must not skip: {reason}"
    return rep


# --------------------------------------------------------------------------- delegating


# A systemd test took ~80 s, the ansible test 600-1150 s, at load 20; a timeout only ends a guest that hangs.
SECONDS_PER_TEST = 120.0  # a guest batch's timeout: this much per test, at least the guest kind's default


@dataclass
class _GuestBatch:
    """One guest boot that ran a batch of tests, and the reports it left per node id."""

    kind: guest.GuestKind
    result: guest.GuestResult
    reports: dict[str, list[TestReport]]


class _PendingBatch:
    """One guest boot running a batch of tests in a thread of its own, while pytest goes on here."""

    def __init__(self, config: pytest.Config, kind: guest.GuestKind, name: str, items: list[pytest.Item],
                 of_kind: int) -> None:
        self.config, self.kind, self.name, self.items, self.of_kind = config, kind, name, items, of_kind
        self.cancel = threading.Event()
        self.result: guest.GuestResult | None = None
        self.thread = threading.Thread(target=self._run, name=f"lab-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--tb={self.config.option.tbstyle}"]
        if self.config.option.verbose > 0:
            argv.append("-" + "v" * self.config.option.verbose)
        # `-m ""`: the host chose these tests; pyproject's `-m 'not distro'` must not deselect them again in the guest.
        argv += ["-m", "", "--rootdir", str(self.config.rootpath), *[i.nodeid for i in self.items]]
        # The batch's time grows with its tests (a busy 2-core machine runs a UML test in 20-60 s): the guest's
        # timeout does too, unless GREUPD_LAB_TIMEOUT says otherwise. A hung guest still ends. Counted over all
        # of the kind's tests, not the shard's: one slow test (ansible: 600-1150 s at load 20) can fill a shard.
        timeout = None if os.environ.get("GREUPD_LAB_TIMEOUT") else max(
            guest.DEFAULT_TIMEOUT[self.kind], SECONDS_PER_TEST * self.of_kind)
        try:
            self.result = guest.run(self.kind, argv, cwd=self.config.rootpath, env={"GREUPD_LAB_REPORT": "1"},
                                    collect=[REPORT_FILE], cancel=self.cancel, timeout=timeout)
        except Exception as exc:  # reported with each of the batch's tests, not lost in a thread
            self.result = guest.GuestResult(self.kind, None, "", "", 0.0, booted=False,
                                            error=f"lab error: {type(exc).__name__}: {exc}")

    def wait(self) -> _GuestBatch:
        """The batch's reports, once the guest is gone (parsed here: pytest's hooks are not for threads)."""
        waited = time.monotonic()
        self.thread.join()
        waited = time.monotonic() - waited
        res = self.result
        assert res is not None
        reports: dict[str, list[TestReport]] = {}
        for line in res.files.get(REPORT_FILE, "").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:  # the last line of a guest that died while writing it
                continue
            rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
            if isinstance(rep, TestReport):
                reports.setdefault(rep.nodeid, []).append(rep)
        done = sum(1 for i in self.items if i.nodeid in reports)
        # The guest pytest's own summary line, e.g. "3 passed in 12.1s", or what went wrong.
        last = res.output.strip().splitlines()[-1:] if res.status is not None else []
        note = f"; {res.error}" if res.error else f": {last[0]}" if last else ""
        shard = f" {self.name}" if self.name != self.kind else ""
        cpu = f", CPU {res.cpu_seconds:.0f} s" if res.cpu_seconds is not None else ""
        _say(self.config, f"lab: ran {done} tests in the {self.kind} guest{shard} ({res.seconds:.1f} s{cpu}, "
                          f"of which {waited:.1f} s waited for here){note}")
        _record_durations(reports)
        return _GuestBatch(self.kind, res, reports)


def _record_durations(reports: dict[str, list[TestReport]]) -> None:
    """Keep each finished test's time in .lab/durations.json, for the next run's shards (see balance)."""
    took = {nodeid: round(sum(r.duration for r in reps), 1) for nodeid, reps in reports.items()
            if any(r.when == "teardown" for r in reps)}
    if not took or os.environ.get("GREUPD_LAB_GUEST"):
        return
    path = guest.lab_dir() / DURATIONS.name
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known.update(took)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only checkout: the shards just use the checked-in times
        pass


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if tr is not None:
        started = config.stash.get(_STARTED, None)
        # Also from inside a test's teardown (a handover), where the output would be captured with the test's.
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            tr.write_line(line if started is None else f"{line} [at {time.monotonic() - started:.0f} s]")


def _start(session: pytest.Session, kinds: Collection[guest.GuestKind]) -> None:
    pending = session.stash.setdefault(_PENDING, {})
    batches: dict[str, list[pytest.Item]] = {}
    for item in session.items:  # the session's final list (after -k/-m deselection): what the guests run
        if item.stash.get(_DELEGATE, None) in kinds:
            batches.setdefault(item.stash[_BATCH], []).append(item)
    started = []
    for name, items in batches.items():
        if name not in pending:
            kind = items[0].stash[_DELEGATE]
            of_kind = sum(1 for i in session.items if i.stash.get(_DELEGATE, None) == kind)
            pending[name] = _PendingBatch(session.config, kind, name, items, of_kind)
            if not guest.unavailable(kind):
                started.append(f"{name} ({len(items)} tests)")
    if started:
        _say(session.config, f"lab: booting guests: {', '.join(started)}")


def _serial() -> bool:
    return os.environ.get("GREUPD_LAB_SERIAL") == "1"


def pytest_collection_finish(session: pytest.Session) -> None:
    # The guests that need nothing from the host's tests boot now and run beside them.
    session.config.stash[_STARTED] = time.monotonic()
    if not session.config.option.collectonly and not _serial():
        # Wait only when a selected host test will hand something over (make install-test): else now (make test).
        handing = any(item.path.name in HANDING_OVER for item in session.items)
        _start(session, [k for k in guest.KINDS if not (handing and k in AFTER_HOST_TESTS)])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """A batch waiting for a handover from the host's tests boots as soon as it is there."""
    session = item.session
    if _serial() or os.environ.get("GREUPD_LAB_GUEST"):
        return
    ready = [k for k, var in AFTER_HOST_TESTS.items() if os.environ.get(var)]
    if ready and any(i.stash.get(_BATCH, None) not in session.stash.get(_PENDING, {})
                     for i in session.items if i.stash.get(_DELEGATE, None) in ready):
        _say(session.config, f"lab: {', '.join(AFTER_HOST_TESTS[k] for k in ready)} handed over")
        _start(session, ready)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A guest still running when pytest stops (-x, Ctrl-C, a crash) is killed, not left behind."""
    for batch in session.stash.get(_PENDING, {}).values():
        batch.cancel.set()
    for batch in session.stash.get(_PENDING, {}).values():
        batch.thread.join()


def _synth(item: pytest.Item, when: _When, outcome: _Outcome, longrepr: Any) -> TestReport:
    return TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1), outcome, longrepr, when)


def _replay(item: pytest.Item, batch: _GuestBatch) -> Iterator[TestReport]:
    got = batch.reports.get(item.nodeid)
    res = batch.result
    if got and any(r.when == "teardown" for r in got):
        for rep in got:
            rep.sections.append(("lab", f"ran in the {batch.kind} guest"))
            yield rep
        return
    # The guest never ran (or never finished) this test: say why, with the console's last words.
    if res.error and res.error.startswith("guest unavailable") and not _ci():
        yield _synth(item, "setup", "skipped", (str(item.path), (item.location[1] or 0) + 1, f"lab: {res.error}"))
        yield _synth(item, "teardown", "passed", None)
        return
    if got:  # it started: keep what the guest reported, fail the phase that never ended
        yield from got
        when: _When = "call" if any(r.when == "setup" for r in got) else "setup"
    else:  # it never started (the guest did not boot, or died first): FAILED, not an ERROR
        yield _synth(item, "setup", "passed", None)
        when = "call"
    yield _synth(item, when, "failed", f"lab: the {batch.kind} guest did not report this test.\n{res.describe()}")
    yield _synth(item, "teardown", "passed", None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    kind = item.stash.get(_DELEGATE, None)
    if kind is None:
        return None
    name = item.stash[_BATCH]
    done = item.session.stash.setdefault(_RESULTS, {})
    if name not in done:
        # The host's own tests are over (they come first): every batch not yet booted boots now.
        _start(item.session, [kind] if _serial() else guest.KINDS)
        done[name] = item.session.stash[_PENDING][name].wait()
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for rep in _replay(item, done[name]):
        item.ihook.pytest_runtest_logreport(report=rep)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


# --------------------------------------------------------------------------- inside the guest


class _GuestReporter:
    """Writes every test report as one JSON line, flushed, so a crash loses at most one test."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole session)

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.file.write(json.dumps(data) + "\n")
        self.file.flush()

    def pytest_unconfigure(self) -> None:
        self.file.close()


def pytest_configure(config: pytest.Config) -> None:
    rundir = os.environ.get("GREUPD_LAB_RUNDIR")
    if os.environ.get("GREUPD_LAB_REPORT") == "1" and rundir:
        config.pluginmanager.register(_GuestReporter(config, Path(rundir) / REPORT_FILE), "greupd-lab-reporter")
