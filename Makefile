# greupd: developer and CI entry points. `make test` installs what it needs (Debian 12, as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_VENV := $(VENV)/.stamp-venv

# Build tools first: systemd-python has no wheel, pip compiles it against libsystemd-dev.
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev \
	user-mode-linux kmod iproute2 iputils-ping nftables libnftables1 tcpdump systemd \
	qemu-system-x86 linux-image-amd64 busybox-static \
	debhelper dpkg-dev dh-python python3-pip pipx man-db groff-base rpm lintian mmdebstrap \
	charon-systemd strongswan-swanctl strongswan-charon libstrongswan-standard-plugins \
	frr bird2 conntrack
# virtme-ng (for the qemu guest) lives in the venv; its `vng` is what lab/guest.py runs.
PIP_EXTRA := virtme-ng

.PHONY: all venv wheelhouse deps apt-deps test install-test pytest lint ruff mypy demo bench soak fuzz deb rpm clean

all: test

# The venv is rebuilt when pyproject.toml changes; otherwise this is a no-op.
venv: $(STAMP_VENV)
$(STAMP_VENV): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The packages' Python libraries, fetched here on the host: packaging/build-deb and the RPM spec install
# from this folder only (pip --no-index), so a package builds without network, in a lab guest included.
# Debian's own pip and interpreter, the ones the package's venv runs on, so the wheels match its ABI.
# Rebuilt when pyproject.toml changes; setuptools and wheel build greupd and systemd-python's sdist.
WHEELHOUSE := build/wheelhouse
STAMP_WHEELHOUSE := $(WHEELHOUSE)/.stamp
wheelhouse: $(STAMP_WHEELHOUSE)
$(STAMP_WHEELHOUSE): pyproject.toml
	mkdir -p $(WHEELHOUSE)
	/usr/bin/python3.11 -m pip download --quiet --disable-pip-version-check --no-input -d $(WHEELHOUSE) \
		$$(/usr/bin/python3.11 packaging/requirements pyproject.toml)
	touch $@

# apt-get runs only when a package is missing (dpkg -s), so repeated runs are quick and quiet.
apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: apt-get install" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
	fi

# System packages, then the venv (whose build needs them), then the venv's extras for the lab, then the
# packages' wheelhouse.
deps: apt-deps
	@$(MAKE) --no-print-directory venv wheelhouse
	@$(PY) -m pip show -q $(PIP_EXTRA) >/dev/null 2>&1 \
		|| $(PY) -m pip install -q --disable-pip-version-check $(PIP_EXTRA)

# Lint beside pytest (it would add ~30 s in front: the guests' boots leave it CPU), its output printed after pytest's,
# then pytest's summary line again so that it comes last; the target fails if either did.
test: deps
	@mkdir -p .lab; $(MAKE) --no-print-directory lint > .lab/lint.log 2>&1 & lint_pid=$$!; \
	$(VENV)/bin/pytest tests | tee .lab/pytest.log; rc=$${PIPESTATUS[0]}; \
	wait $$lint_pid; lint=$$?; cat .lab/lint.log; \
	if [ $$lint -ne 0 ]; then echo "make test: lint failed (ruff/mypy output above)"; fi; \
	tail -n 1 .lab/pytest.log; \
	[ $$rc -eq 0 ] && [ $$lint -eq 0 ]

# The install tests (pytest marker `distro`, which plain `pytest` leaves out): the packages built from this checkout
# (.deb for Debian 12 and 13, RPM; lintian) and read (tests/test_packaging.py); the .deb installed with dpkg and run
# as greupd.service under systemd as PID 1, in UML and, for nftables inet, under qemu (tests/test_systemd_lab.py,
# tests/test_systemd_nft_lab.py); installed in a fresh root of each Debian release (mmdebstrap, cached by package
# list under /var/cache/greupd-lab/roots) booted with systemd, README's install block run there, then purged; and
# pip + `greupd install-units` in a fresh venv, and the same by pipx. .ci/run runs this after `make test`.
install-test: deps
	$(VENV)/bin/pytest -m distro tests

# PYTEST_ARGS: a selection instead of every test, e.g. PYTEST_ARGS="tests/test_lab.py -x".
pytest: deps
	$(VENV)/bin/pytest $(or $(PYTEST_ARGS),tests)

lint: ruff mypy

ruff: $(STAMP_VENV)
	$(VENV)/bin/ruff check .

mypy: $(STAMP_VENV)
	$(VENV)/bin/mypy --strict greupd lab tests demo bench

# ---------------------------------------------------------------------------------------------
# demo: the seed's whole two-router story, run by greupd in a kernel with ip_gre and nftables inet (the vng guest).
demo: deps
	$(PY) -m lab run --guest vng -- $(PY) -m demo.seed_story
# ---------------------------------------------------------------------------------------------

# bench: every benchmark, natively and in the lab guests (~70 min quiet, the hub's 2000 UML tunnels a third of it),
# raw JSON in bench/results/, tables in BENCHMARKS.md.
# BENCH_ARGS=--quick for a smoke run (results under .lab/bench-quick/).
bench: $(STAMP_VENV)
	@$(MAKE) --no-print-directory deps
	PY=$(PY) bench/run $(BENCH_ARGS)

# ---------------------------------------------------------------------------------------------
# soak: greupd under a seeded random sequence of faults in the UML guest (lab/soak.py; minutes). Its figures
# and the command that replays the run are printed at the end. SOAK_ARGS, e.g. "--minutes 30 --seed 42"
# (default: 5 minutes, a random seed, every fault; `--faults round3` the faults of issue #21 alone); the guest is
# stopped after SOAK_TIMEOUT seconds. The whole output is kept in $(SOAK_RECORD).log and the figures as JSON in
# $(SOAK_RECORD).json (from the soak's `soak-json:` line, so also from a guest that cannot write to the host's
# disk); the target fails when the soak did (an invariant broke) or the guest did.
# SOAK_GUEST=vng: the qemu guest, whose kernel has nftables' inet family, so the `nft flush ruleset` fault runs
# too (and the tunnels get an MSS clamp and NAT; with charon installed, to_b runs over IPsec and the xfrm-flush
# fault runs); much slower to boot and run without KVM (RELIABILITY.md): give it --bound 60 --restart-bound 600.
SOAK_ARGS ?= --duration 300
SOAK_TIMEOUT ?= 7200
SOAK_GUEST ?= uml
SOAK_STAMP := $(shell date -u +%Y%m%dT%H%M%SZ)
SOAK_RECORD ?= .lab/soak-records/soak-$(SOAK_GUEST)-$(SOAK_STAMP)
soak: deps
	@mkdir -p $(dir $(SOAK_RECORD))
	@echo "soak: output in $(SOAK_RECORD).log, figures in $(SOAK_RECORD).json"
	set -o pipefail; $(PY) -m lab run --guest $(SOAK_GUEST) --timeout $(SOAK_TIMEOUT) -- $(PY) -m lab.soak $(SOAK_ARGS) \
		2>&1 | tee $(SOAK_RECORD).log; status=$$?; \
		sed -n 's/^soak-json: //p' $(SOAK_RECORD).log > $(SOAK_RECORD).json; \
		test -s $(SOAK_RECORD).json || echo "soak: no figures (the soak did not reach its end; see $(SOAK_RECORD).log)"; \
		exit $$status
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Packages, into dist/ (README "Install on a router"). On Debian 12 `make deb` builds both Debian packages:
# greupd_VERSION_amd64.deb for Debian 12 (its own venv on python3.11) and greupd_VERSION+deb13_all.deb for
# Debian 13 (Debian's python3-* packages); DEB_SUITES=trixie builds one. `make rpm`: Fedora/RHEL 9 and later.
DEB_SUITES ?= bookworm trixie
deb: apt-deps wheelhouse
	@for suite in $(DEB_SUITES); do packaging/build-deb --suite $$suite --out dist || exit 1; done

rpm: apt-deps wheelhouse
	packaging/build-rpm --out dist

# fuzz: the standing hostile-input campaign (fuzz/, atheris): nine parsers of untrusted bytes, each for its own
# time (~12 minutes in all; FUZZ_SECONDS=N: each for N s), then each corpus replayed under coverage.py and one
# table printed (RELIABILITY.md, Fuzzing). Crashing inputs are saved under fuzz/crashes/<target>/.
# FUZZ_ARGS, e.g. "--targets gre,rtnl" or "--replay" (which committed reproducers still crash).
fuzz: deps
	$(PY) -m fuzz $(FUZZ_ARGS)
# ---------------------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) .lab .fuzz build dist .mypy_cache .ruff_cache .pytest_cache
