#!/usr/bin/env bash
# Builds the Debian package, sapd-nfq_<version>_<arch>.deb, from this tree with Debian's
# own tools, as root on Debian 12:
#
#   packaging/build-deb.sh [OUT_DIR]      (default: dist/ in the tree)
#
# It installs what debian/control's Build-Depends names (from Debian, only what is missing),
# fetches netfilterqueue's sdist with pip, checked against debian/netfilterqueue.sha256,
# and runs `dpkg-buildpackage -b` in a copy of the tree, so the tree stays as it was. It
# prints the path of the .deb. Nothing is installed from the package itself.
set -euo pipefail
# Debian's Python and tools, whatever else is on PATH
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/dist}

[ "$(id -u)" = 0 ] || { echo "$0: run as root (it installs the build dependencies)" >&2; exit 1; }

# Build-Depends, without version constraints or alternatives, and what the steps here run
needed=(dpkg-dev build-essential python3-pip)
mapfile -t -O ${#needed[@]} needed < <(
    sed -n '/^Build-Depends:/,/^[A-Z]/p' "$repo/debian/control" | sed 's/^Build-Depends://' \
        | grep -v '^[A-Z]' | tr ',' '\n' | sed 's/[(|].*//; s/ //g' | grep -v '^$')
needed=("${needed[@]/#debhelper-compat/debhelper}")
missing=()
for pkg in "${needed[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-deb: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

work=$(mktemp -d /var/tmp/sapd-nfq-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/sapd-nfq
mkdir "$src"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./vagrant/.vagrant \
    --exclude=./bench/work --exclude=__pycache__ --exclude='.*_cache' --exclude=.hypothesis \
    --exclude=./debian/vendor -cf - . | tar -C "$src" -xf -

read -r _hash sdist < "$repo/debian/netfilterqueue.sha256"
release=${sdist%.tar.gz}  # NetfilterQueue-1.1.0
mkdir "$src/debian/vendor"
python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$src/debian/vendor" "netfilterqueue==${release##*-}" >&2
(cd "$src/debian/vendor" && sha256sum --check --strict --quiet ../netfilterqueue.sha256) >&2

(cd "$src" && dpkg-buildpackage -us -uc -b) > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
mkdir -p "$out"
deb=$(cd "$work" && ls sapd-nfq_*.deb)
mv "$work/$deb" "$out/"
echo "$out/$deb"
