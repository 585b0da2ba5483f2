"""Choosing the reader for a source, picking the named tunnels, and writing the file: `greupd import` in one call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from greupd.importer import FoundTunnel, ImportProblem, Source
from greupd.importer.write import render


def read_tunnels(source: Source, path: Path | None) -> tuple[list[FoundTunnel], list[str], bool | None]:
    """The tunnels a source describes, notes for the file's head, and (kernel only) whether forwarding is on."""
    if source == "kernel":
        from greupd.importer import iptables
        from greupd.importer.kernel import ip_forward_off, tunnels_from_kernel

        if path is not None:
            raise ImportProblem("--from kernel reads the running kernel and takes no PATH")
        tunnels = tunnels_from_kernel()
        rules, note = iptables.running_rules()
        iptables.suggest(tunnels, rules)
        return tunnels, [note] if note else [], False if ip_forward_off(tunnels) else None
    if source == "netplan":
        from greupd.importer.netplan import DEFAULT_PATH as netplan_default
        from greupd.importer.netplan import tunnels_from_netplan

        return tunnels_from_netplan(_existing(path or netplan_default)), [FORWARDING_NOTE], None
    if source == "networkd":
        from greupd.importer.networkd import DEFAULT_PATH as networkd_default
        from greupd.importer.networkd import tunnels_from_networkd

        return tunnels_from_networkd(_existing(path or networkd_default)), [FORWARDING_NOTE], None
    from greupd.importer.ifupdown import DEFAULT_PATH as ifupdown_default
    from greupd.importer.ifupdown import tunnels_from_ifupdown

    notes = [FORWARDING_NOTE]
    return tunnels_from_ifupdown(_existing(path or ifupdown_default), notes), notes, None


# A file format does not say whether the host forwards (that is sysctl.conf's business); greupd does by default.
FORWARDING_NOTE = ("greupd sets net.ipv4.ip_forward=1 (and IPv6 forwarding for IPv6 tunnels) by default;"
                   " add [daemon] ip_forward = false if this host must not forward.")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise ImportProblem(f"{path}: no such file or directory")
    return path


def import_config(source: Source, path: Path | None, names: Sequence[str]) -> str:
    """The tunnels.toml text for `greupd import`; ImportProblem if a named tunnel is not there."""
    tunnels, notes, ip_forward = read_tunnels(source, path)
    if names:
        by_name = {t.name: t for t in tunnels}
        missing = [n for n in names if n not in by_name]
        if missing:
            where = "the running kernel" if source == "kernel" else str(path or f"the {source} files")
            raise ImportProblem(f"no GRE-family tunnel named {', '.join(missing)} in {where}")
        tunnels = [by_name[n] for n in dict.fromkeys(names)]
    if not tunnels:
        notes = [*notes, "no GRE-family tunnel found"]
    return render(tunnels, source, notes, ip_forward)
