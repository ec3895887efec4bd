#!/bin/sh
# Installs the Debian/Ubuntu packages pyvirt needs (only those missing).
# --pypy: also PyPy (Debian's pypy3) with what building pyvirt's dependencies needs.
set -eu
EXTRA=""
[ "${1:-}" = "--pypy" ] && EXTRA="pypy3 pypy3-venv pypy3-dev"
PKGS="$EXTRA python3 python3-venv python3-dev build-essential swig pkg-config \
 qemu-system-misc qemu-utils qemu-user gcc-riscv64-linux-gnu binutils-riscv64-linux-gnu \
 linux-source-6.1 bc flex bison libssl-dev libelf-dev cpio xz-utils zstd \
 e2fsprogs gpgv gpg debian-archive-keyring passt mmdebstrap debootstrap device-tree-compiler opensbi \
 libc6-dev-riscv64-cross umoci skopeo docker-registry iperf3"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "pyvirt: installing system packages:$missing"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
