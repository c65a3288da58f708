#!/bin/sh
# The lab's network on a VM of vagrant/Vagrantfile: the addresses and routes that
# sapd_nfq/lab/topology.py gives the namespaces (tests/lab/test_vagrant_lab.py checks that
# both agree).
#
#   network.sh client|gw|server
#
# Vagrant has given each lab link its IPv4 address; this finds the link by that address,
# names it as in the namespace lab (client: to-gw; gw: to-client, to-server; server: to-gw),
# adds the IPv6 addresses (and the client's address pool), routes the lab's ranges through
# gw, and makes gw forward. Other links and the default route (Vagrant's own) stay as they
# are. Safe to run again, and run at every boot: nothing here outlives a reboot.
set -eu

POOL_SIZE=16  # client pool addresses: 198.18.3.10.. and 2001:db8:3::a..

usage() {
    echo "usage: $0 client|gw|server" >&2
    exit 2
}

link() {  # link IPV4/LEN IPV6/LEN NAME: the link holding IPV4 gets NAME and IPV6
    current=$(ip -o -4 addr show to "${1%/*}/32" | awk '{ print $2; exit }')
    [ -n "$current" ] || { echo "$0: no link has ${1%/*}" >&2; exit 1; }
    if [ "$current" != "$3" ]; then
        ip link set dev "$current" down
        ip link set dev "$current" name "$3"
    fi
    ip link set dev "$3" up
    # nodad: usable at once, as in the namespaces (no duplicate address detection).
    ip -6 addr replace "$2" dev "$3" nodad
}

route() {  # route VIA4 VIA6 SRC4 SRC6: the lab's ranges through gw, from our own address
    ip route replace 198.18.0.0/15 via "$1" src "$3"
    ip -6 route replace 2001:db8::/32 via "$2" src "$4"
}

pool() {  # the client's extra addresses on to-gw (the gw holds .1 / ::1 of the pool)
    i=0
    while [ "$i" -lt "$POOL_SIZE" ]; do
        n=$((10 + i))
        ip addr replace "198.18.3.$n/24" dev to-gw
        ip -6 addr replace "2001:db8:3::$(printf %x "$n")/64" dev to-gw nodad
        i=$((i + 1))
    done
}

[ $# -eq 1 ] || usage
case "$1" in
    client)
        link 198.18.1.2/24 2001:db8:1::2/64 to-gw
        pool
        route 198.18.1.1 2001:db8:1::1 198.18.1.2 2001:db8:1::2
        ;;
    gw)
        link 198.18.1.1/24 2001:db8:1::1/64 to-client
        link 198.18.2.1/24 2001:db8:2::1/64 to-server
        ip addr replace 198.18.3.1/24 dev to-client
        ip -6 addr replace 2001:db8:3::1/64 dev to-client nodad
        sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
        ;;
    server)
        link 198.18.2.2/24 2001:db8:2::2/64 to-gw
        route 198.18.2.1 2001:db8:2::1 198.18.2.2 2001:db8:2::2
        ;;
    *) usage ;;
esac
