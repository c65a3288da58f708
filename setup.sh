#!/usr/bin/env bash
# Installs what sapd-nfq, its tests and its lab need on Debian 12, as root:
# the Debian packages, then a virtualenv in .venv with sapd-nfq installed.
# Safe to run again. It never configures or starts the host's own mail
# services: the lab runs Postfix and Dovecot from its own directories.
#
#   setup.sh               everything, vagrant and the VM tools included (the lab tests boot vagrant/)
#   setup.sh --no-vagrant  a VM of vagrant/Vagrantfile: no VM tools, sapd-nfq without its test tools
#   setup.sh --no-vagrant --debian-only
#                          the Debian packages alone, no .venv: how vagrant/build-box.sh fills the box
set -euo pipefail
cd "$(dirname "$0")"

with_vagrant=yes with_venv=yes
for arg; do
    case "$arg" in
        --no-vagrant) with_vagrant="" ;;
        --debian-only) with_venv="" ;;
        *) echo "usage: $0 [--no-vagrant] [--debian-only]" >&2; exit 2 ;;
    esac
done

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
# The Debian package's build (packaging/build-deb.sh, tests/test_debian_package.py) and lintian
[ -z "$with_vagrant" ] || packages+=(
    dpkg-dev build-essential debhelper dh-python pybuild-plugin-pyproject python3-all-dev
    python3-setuptools python3-wheel python3-pip cython3 lintian
)
# The VMs' gateway installs that package: its dependencies from Debian, in the box
[ -n "$with_vagrant" ] || packages+=(python3-pyroute2 python3-prometheus-client)
# vagrant/build-box.sh and the VM tests: libvirt with QEMU, a box debootstrapped here
[ -z "$with_vagrant" ] || packages+=(
    vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
    dnsmasq-base debootstrap e2fsprogs rsync openssh-client
)
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

[ -n "$with_venv" ] || { echo "setup.sh: Debian packages ready"; exit 0; }

python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
extras='[test,dev]'
[ -n "$with_vagrant" ] || extras=''  # the VMs run sapd-nfq; the tests run on the host
.venv/bin/pip install -q -e ".$extras"
# The compiled engine (sapd_nfq/compiled.py), made with the mypy of the dev extra and the
# compiler netfilterqueue needed; where it does not build, the Python engine runs.
if [ -n "$with_vagrant" ]; then
    if .venv/bin/python -m sapd_nfq.build_engine > .venv/compiled-engine.log 2>&1; then
        echo "setup.sh: $(tail -1 .venv/compiled-engine.log)"
    else
        echo "setup.sh: the compiled engine did not build (.venv/compiled-engine.log): the Python engine runs"
    fi
fi
echo "setup.sh: ready (.venv/bin/sapd-nfq)"
