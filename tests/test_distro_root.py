"""lab/distro_root.py's pure parts: which mirror, which packages, which cache key (the roots themselves: make
install-test)."""

from __future__ import annotations

import pytest

from lab.distro_root import RootError, deb_dependencies, debian_mirror, root_key

POLICY = """Package files:
 100 /var/lib/dpkg/status
     release a=now
 500 http://mirror.invalid/debian-security bookworm-security/main amd64 Packages
     release v=12,o=Debian,a=oldstable-security,n=bookworm-security,l=Debian-Security,c=main,b=amd64
 500 http://mirror.invalid/debian bookworm-updates/main amd64 Packages
     release v=12-updates,o=Debian,a=oldstable-updates,n=bookworm-updates,l=Debian,c=main,b=amd64
 500 http://mirror.invalid/debian bookworm/main amd64 Packages
     release v=12.15,o=Debian,a=oldstable,n=bookworm,l=Debian,c=main,b=amd64
 500 https://other.invalid/apt nodistro/main amd64 Packages
     release o=Other,n=nodistro,c=main,b=amd64
Pinned packages:
"""


def test_the_mirror_is_the_one_serving_debians_main_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GREUPD_LAB_MIRROR", raising=False)
    assert debian_mirror(POLICY) == "http://mirror.invalid/debian"
    with pytest.raises(RootError, match="GREUPD_LAB_MIRROR"):
        debian_mirror("Package files:\n 100 /var/lib/dpkg/status\n     release a=now\n")
    monkeypatch.setenv("GREUPD_LAB_MIRROR", "http://forced.invalid/debian")
    assert debian_mirror(POLICY) == "http://forced.invalid/debian"


def test_dependencies_take_the_first_alternative_without_versions() -> None:
    depends = ("libc6 (>= 2.34), systemd | systemd-standalone-sysusers | systemd-sysusers, python3:any, "
               "python3-pydantic (>= 2.7), iproute2")
    assert deb_dependencies(depends) == ["libc6", "systemd", "python3", "python3-pydantic", "iproute2"]
    assert deb_dependencies("") == []


def test_the_key_follows_the_package_set_not_its_order() -> None:
    key = root_key("trixie", "http://m/debian", ["b", "a"])
    assert key == root_key("trixie", "http://m/debian", ["a", "b", "a"])
    assert key != root_key("trixie", "http://m/debian", ["a", "b", "c"])
    assert key != root_key("bookworm", "http://m/debian", ["a", "b"])
