#!/usr/bin/env bash
# Builds the libvirt box the Vagrantfile boots, from Debian's packages alone (no box is
# downloaded), as root on Debian 12:
#
#   vagrant/build-box.sh OUT_DIR      writes OUT_DIR/sapd-nfq-bookworm.box and OUT_DIR/box.key
#   vagrant/build-box.sh --key        prints the key of the box this tree would build
#
# debootstrap makes a Debian 12 root with the cloud kernel, sshd, sudo, ifupdown and a DHCP
# client, and Vagrant's published insecure key for the user `vagrant`; setup.sh (Debian
# packages only) puts in what the lab's hosts run, so provisioning under emulation never
# waits on apt; the Python wheels sapd-nfq needs are built in the root by its own Python and
# installed offline in the VMs (/etc/pip.conf: no index). The root is written into an ext4 image by mke2fs -d (no loop
# mount), converted to qcow2 and packed with the kernel and initrd, which the box's own
# Vagrantfile boots directly (no boot loader). box.key names the inputs the box was built
# from: a box whose key matches needs no rebuild.
#
# The Debian mirror is the host's (its apt sources), or SAPD_BOX_MIRROR.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR | --key" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

SUITE=bookworm
DISK_SIZE=8G  # the VM's root: sparse, so the box holds only what is written
WHEELS=/var/cache/sapd-nfq/wheels  # inside the box
# Boots the box's kernel on the unpartitioned disk; eth0, eth1... as Vagrant names them.
CMD_LINE="root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"

box_key() {  # what the box depends on: this script, the package list, Python's requirements
    cat "$here/build-box.sh" "$repo/setup.sh" "$repo/pyproject.toml" | sha256sum | cut -c1-16
}
[ "$1" != --key ] || { box_key; exit 0; }
[ "$(id -u)" = 0 ] || { echo "$0: run as root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$1"
out=$(cd "$1" && pwd)

mirror() {  # the host's Debian mirror: deb822 sources first, then sources.list
    if [ -n "${SAPD_BOX_MIRROR-}" ]; then echo "$SAPD_BOX_MIRROR"; return; fi
    local m
    m=$(awk '/^URIs:/ { u = $2 } /^Suites:/ && / '"$SUITE"'( |$)/ && u { print u; exit }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1 == "deb" && $3 == "'"$SUITE"'" { print $2; exit }' \
        /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$m" ] || { echo "$0: no $SUITE mirror in the host's apt sources; set SAPD_BOX_MIRROR" >&2; exit 1; }
    echo "$m"
}

work=$(mktemp -d /var/tmp/sapd-box.XXXXXX)
root=$work/root
mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }

step() { printf '%s build-box: %s\n' "$(date +%T)" "$*"; }

mirror=$(mirror)
step "debootstrap $SUITE from $mirror"
debootstrap --variant=minbase \
    --include=systemd-sysv,udev,kmod,ifupdown,isc-dhcp-client,openssh-server,sudo,rsync,iproute2,linux-image-cloud-amd64 \
    "$SUITE" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

step "the lab's Debian packages (setup.sh --debian-only)"
for fs in proc sys dev dev/pts; do
    mount --bind "/$fs" "$root/$fs"
    mounted+=("$root/$fs")
done
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$SUITE" "$mirror" "$SUITE" \
    > "$root/etc/apt/sources.list"
cp /etc/resolv.conf "$root/etc/resolv.conf"
rsync -a --exclude .git/ --exclude .venv/ --exclude vagrant/.vagrant/ "$repo/" "$root/tmp/sapd-nfq/"
in_root /tmp/sapd-nfq/setup.sh --no-vagrant --debian-only > "$work/setup.log" 2>&1 \
    || { tail -30 "$work/setup.log" >&2; exit 1; }
in_root apt-get clean

step "Python wheels for sapd-nfq, built by the box's own Python"
mkdir -p "$root$WHEELS"
in_root python3 -m venv /tmp/wheels-venv
# pip in the root reaches the index as the host's pip does: the host's CA bundle (a proxy's
# authority may be in it) and the host's index, if its pip is given one.
pip_env=(HOME=/root)
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
    pip_env+=(PIP_CERT=/tmp/host-ca.crt)
fi
if index=$(python3 -m pip config get global.index-url 2>/dev/null); then
    pip_env+=(PIP_INDEX_URL="$index")
fi
in_root env "${pip_env[@]}" /tmp/wheels-venv/bin/pip wheel -q -w "$WHEELS" pip setuptools wheel /tmp/sapd-nfq \
    > "$work/wheels.log" 2>&1 || { tail -30 "$work/wheels.log" >&2; exit 1; }
rm -rf "$root/tmp/wheels-venv" "$root/tmp/host-ca.crt" "$root/root/.cache" "$root$WHEELS"/sapd_nfq-*.whl  # the VMs install the repository they are given
printf '[global]\nno-index = true\nfind-links = %s\n' "$WHEELS" > "$root/etc/pip.conf"

step "users, ssh, network, boot"
in_root useradd --create-home --shell /bin/bash --groups sudo vagrant
# Vagrant's published insecure key, as the vagrant package ships it; `vagrant up` swaps it
# for a key of its own at the first login.
vagrant_pub=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub | tail -1)
install -d -m 700 "$root/home/vagrant/.ssh"
install -m 600 "$vagrant_pub" "$root/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"
# Each VM makes its own host keys at its first boot.
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/systemd/system/ssh.service.d"
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    > "$root/etc/systemd/system/ssh.service.d/host-keys.conf"
# The lab starts its own Postfix, Dovecot and Redis from its own directories; the packaged
# services stay off, and so do timers that would spend emulated CPU on housekeeping.
in_root systemctl disable --quiet postfix dovecot redis-server apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer
printf 'UseDNS no\n' > "$root/etc/ssh/sshd_config.d/vagrant.conf"
printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n\nsource /etc/network/interfaces.d/*\n' \
    > "$root/etc/network/interfaces"
printf '/dev/vda / ext4 errors=remount-ro 0 1\n' > "$root/etc/fstab"
printf 'box\n' > "$root/etc/hostname"
: > "$root/etc/resolv.conf"  # the VMs resolve nothing: the lab has its own hosts file
rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
: > "$root/etc/machine-id"  # systemd makes one per VM at first boot
rm -rf "$root/tmp/sapd-nfq" "$root"/var/lib/apt/lists/*
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}"; done
mounted=()

step "disk image (mke2fs -d, qcow2)"
box=$work/box
mkdir "$box"
truncate -s "$DISK_SIZE" "$work/root.raw"
mke2fs -q -t ext4 -L root -d "$root" "$work/root.raw"
qemu-img convert -c -O qcow2 "$work/root.raw" "$box/box.img"
rm "$work/root.raw"
cp "$kernel" "$box/vmlinuz"
cp "$initrd" "$box/initrd.img"
size=$(( $(qemu-img info --output=json "$box/box.img" | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])') / 1024 / 1024 / 1024 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size" > "$box/metadata.json"
cat > "$box/Vagrantfile" <<EOF
# The box's own settings: boot its kernel and initrd, which sit beside this file.
Vagrant.configure("2") do |config|
  config.vm.provider "libvirt" do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "$CMD_LINE"
  end
end
EOF
tar -C "$box" -cf "$work/box.tar" metadata.json box.img vmlinuz initrd.img Vagrantfile
mv "$work/box.tar" "$out/sapd-nfq-$SUITE.box"
box_key > "$out/box.key"
step "$out/sapd-nfq-$SUITE.box ($(du -h "$out/sapd-nfq-$SUITE.box" | cut -f1)), key $(cat "$out/box.key")"
