#!/bin/sh
# Run by tests/test_install_distro.py inside a fresh Debian root booted with systemd as PID 1 (UML, lab/guest.py
# root=): README's install block as an administrator would type it, then checks, then `apt purge greupd`.
#   install_in_guest.sh DEB README_BLOCK
# This machine is router A (172.19.1.1 on veth a0); router B is a network namespace with a plain kernel GRE
# tunnel back to A whose kernel reflects A's keepalives (kernel-lab.md), so "the tunnel is up" means the peer
# answered. Each step prints a line starting with "step:"; the first failure stops it with a message.
set -eu
export DEBIAN_FRONTEND=noninteractive  # no tty in the guest: debconf would try three frontends first
deb=$1
block=$2
fail() { echo "FAILED: $*"; journalctl -u greupd --no-pager -n 40 2>&1 || true; exit 1; }
step() { echo "step: $* ($(cut -d' ' -f1 /proc/uptime) s)"; }

step "underlay: A 172.19.1.1 here, B 172.19.1.2 in netns b with a kernel GRE peer"
ip netns add b
ip link add a0 type veth peer name b0 netns b
ip addr add 172.19.1.1/24 dev a0
ip link set a0 up
ip -n b link set lo up
ip -n b addr add 172.19.1.2/24 dev b0
ip -n b link set b0 up
ip -n b tunnel add to_a mode gre local 172.19.1.2 remote 172.19.1.1 ttl 64
ip -n b addr add 192.168.8.11 peer 192.168.8.1 dev to_a
ip -n b link set to_a up
# No procps (sysctl) in a minimal root: the files themselves.
ip netns exec b sh -c 'cd /proc/sys/net/ipv4 && echo 1 >ip_forward && echo 1 >conf/to_a/accept_local &&
    echo 0 >conf/to_a/rp_filter && echo 0 >conf/all/rp_filter'
ip -n b route add 10.10.1.0/24 dev to_a

step "README's install block, in the folder that holds $(basename "$deb")"
cd "$(dirname "$deb")"
quote() { sed 's/^/  | /' "$1"; }
sh -eux "$block" >/tmp/block.out 2>&1 || { quote /tmp/block.out; fail "README's install block failed"; }
quote /tmp/block.out
[ -x /usr/bin/greupd ] || fail "no /usr/bin/greupd after the install block"

step "greupd.service active, the tunnel up"
systemctl is-active --quiet greupd || fail "greupd.service is $(systemctl is-active greupd)"
[ "$(systemctl show -P User greupd)" = greupd ] || fail "greupd.service does not run as user greupd"
up=""
for _ in $(seq 1 100); do
    if [ "$(greupd status My_Tunnel 2>/dev/null | awk '$1 == "My_Tunnel" {print $2}')" = up ]; then
        up=yes
        break
    fi
    sleep 0.2
done
greupd status | sed 's/^/  | /'
[ -n "$up" ] || fail "My_Tunnel did not come up in 20 s"
ip route show proto 222 | grep -q "^20.10.1.0/24 dev My_Tunnel" || fail "no route to 20.10.1.0/24 (proto greupd)"
ping -c 1 -W 3 192.168.8.11 >/dev/null || fail "no ping through the tunnel to B's 192.168.8.11"
[ "$(stat -c %U "/proc/$(systemctl show -P MainPID greupd)")" = greupd ] || fail "the daemon is not user greupd's"

step "apt purge greupd"
apt-get purge -y greupd >/tmp/purge.out 2>&1 || { quote /tmp/purge.out; fail "apt-get purge greupd failed"; }
quote /tmp/purge.out
status=$(dpkg-query -W -f '${db:Status-Status}' greupd 2>/dev/null || true)
case $status in "" | not-installed) ;; *) fail "greupd is $status after the purge" ;; esac
systemctl daemon-reload
[ "$(systemctl show -P LoadState greupd)" = not-found ] || fail "greupd.service still loads after the purge"
for proc in /proc/[0-9]*; do
    [ "$(stat -c %U "$proc" 2>/dev/null)" = greupd ] && fail "a process of user greupd still runs: $(cat "$proc/cmdline")"
done
for path in /usr/bin/greupd /usr/lib/greupd /etc/greupd /var/lib/greupd /run/greupd /usr/share/greupd \
            /usr/lib/systemd/system/greupd.service /lib/systemd/system/greupd.service; do
    [ -e "$path" ] && fail "$path is left after the purge"
done
step "done: installed, started, tunnel up, purged"
