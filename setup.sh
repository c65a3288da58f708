#!/usr/bin/env bash
# Installs what sapd-nfq, its tests and its lab need on Debian 12, as root:
# the Debian packages, then a virtualenv in .venv with sapd-nfq installed.
# Safe to run again. It never configures or starts the host's own mail
# services: the lab runs Postfix and Dovecot from its own directories.
#
#   setup.sh               everything, vagrant included (the lab tests validate vagrant/)
#   setup.sh --no-vagrant  everything but vagrant: how vagrant/Vagrantfile sets up its VMs
set -euo pipefail
cd "$(dirname "$0")"

with_vagrant=yes
case "${1-}" in
    "") ;;
    --no-vagrant) with_vagrant="" ;;
    *) echo "usage: $0 [--no-vagrant]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    python3 python3-venv python3-dev gcc
    libnetfilter-queue-dev iptables iproute2 kmod procps
    postfix dovecot-core dovecot-pop3d dovecot-imapd openssl redis-server
    swaks libnet-ssleay-perl libio-socket-ssl-perl curl tcpdump
)
[ -z "$with_vagrant" ] || packages+=(vagrant)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    # Postfix must not get a host configuration from us.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Keep packaged daemons (dovecot, redis) from starting on the host during install.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        guard=yes
    fi
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        || { [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
    [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
    # Services a package just enabled stay off: the host's mail setup is not ours.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        for unit in dovecot postfix redis-server; do
            if printf '%s\n' "${missing[@]}" | grep -qx "${unit}\(-core\)\?"; then
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            fi
        done
    fi
fi

python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test,dev]'
echo "setup.sh: ready (.venv/bin/sapd-nfq)"
