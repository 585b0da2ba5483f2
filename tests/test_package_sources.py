"""What the packages are built from, checked without building one (so in `make test`): one maintainer address
everywhere, man page sources groff reads without a warning, every config key in tunnels.toml(5).

The packages themselves are built and read in tests/test_packaging.py (`make install-test`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_package_names_the_same_maintainer() -> None:
    """Debian's Maintainer, its changelog trailer, DEP-5's Upstream-Contact and the RPM changelog: one address.

    No RPM Packager: tag: Fedora's guidelines leave it to the build system (koji, COPR) that signs the package."""
    packaging = REPO / "packaging"
    maintainer = re.search(r"^Maintainer: (.+)$", (packaging / "debian/control").read_text(), re.M)
    assert maintainer
    address = maintainer.group(1)
    assert re.search(rf"^ -- {re.escape(address)}  ", (packaging / "debian/changelog").read_text(), re.M)
    assert f"Upstream-Contact: {address}\n" in (packaging / "debian/copyright").read_text()
    spec = (packaging / "rpm/greupd.spec").read_text()
    assert re.search(rf"^\* \w{{3}} \w{{3}} \d+ \d{{4}} {re.escape(address)} - ", spec, re.M)
    assert not re.search(r"^Packager:", spec, re.M)


@pytest.mark.parametrize("page", ["greupd.8", "tunnels.toml.5"])
def test_man_page_source_has_no_warnings(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(REPO / "docs" / page)], capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stderr) == (0, "")


def test_config_man_page_describes_every_key() -> None:
    from greupd.config import json_schema

    page = (REPO / "docs/tunnels.toml.5").read_text()
    schema = json_schema()
    keys = {key for definition in schema["$defs"].values() for key in definition.get("properties", {})}
    keys |= set(schema["properties"]) - {"tunnel"}
    missing = sorted(k for k in keys if not re.search(rf"^\.(?:B|BR|TP)\b.*\b{re.escape(k)}\b", page, re.M))
    assert not missing, f"tunnels.toml(5) does not describe {missing}"
