#!/usr/bin/env bash
# Builds the real-IPVS test VM into the cache directory: Debian's kernel (vmlinuz) and a busybox
# initramfs holding vm/init and the kernel modules the tests need. vm/run.sh boots it.
#
# Idempotent: it rebuilds only when an output is missing or when this script, vm/init or the
# kernel package that linux-image-amd64 points at changed (all three are hashed into the stamp).
# The kernel .deb is downloaded with `apt-get download`, never installed, and kept in the cache.
# No root needed: depmod only writes below the build directory.
#
# Environment: KUBE2IPVS_VM_CACHE (default: <repo>/.cache/vm).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$VM_DIR")
CACHE=${KUBE2IPVS_VM_CACHE:-$REPO/.cache/vm}
PATH=$PATH:/usr/sbin:/sbin  # depmod and modprobe live in sbin, which a non-root PATH may lack

# Modules loaded by vm/init or on demand by the kernel (request_module runs the initramfs's
# /sbin/modprobe, also after init chroots into the host root). Their dependencies come along.
# Every IPVS scheduler and helper, nftables/iptables, the tunnels of IPVS's `-i` forwarding,
# dummy/veth links for VIPs and namespaces, and what the 9p mount of the host root needs.
MODULE_GLOBS=(
  'kernel/net/netfilter/*.ko'
  'kernel/net/netfilter/ipvs/*.ko'
  'kernel/net/ipv4/netfilter/*.ko'
  'kernel/net/ipv6/netfilter/*.ko'
)
MODULES=(crc32c_generic dummy veth ipip ip6_tunnel virtio_pci 9pnet_virtio 9p)
# The directories the modules above and their dependencies live in: only these leave the .deb.
EXTRACT=(
  './boot/vmlinuz-*' './lib/modules/*/modules.order' './lib/modules/*/modules.builtin'
  './lib/modules/*/modules.builtin.modinfo'
  './lib/modules/*/kernel/net/*' './lib/modules/*/kernel/lib/*' './lib/modules/*/kernel/crypto/*'
  './lib/modules/*/kernel/arch/x86/crypto/*' './lib/modules/*/kernel/drivers/net/dummy.ko'
  './lib/modules/*/kernel/drivers/net/veth.ko' './lib/modules/*/kernel/drivers/virtio/*'
  './lib/modules/*/kernel/fs/9p/*' './lib/modules/*/kernel/fs/netfs/*' './lib/modules/*/kernel/fs/fscache/*'
)

die() { echo "vm/build.sh: error: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb depmod modprobe busybox gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (make system-packages installs what the VM lane needs)"
done
# The initramfs has no libc: its busybox must be the static one.
BUSYBOX=$(command -v busybox)
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked; install busybox-static"; fi

# The kernel linux-image-amd64 depends on today; its name changes with Debian point releases.
resolve_kernel() {
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  KPKG_VERSION=$( [ -z "$KPKG" ] || apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
  [ -n "$KPKG" ] && [ -n "$KPKG_VERSION" ]
}
apt_update() {
  [ "$(id -u)" = 0 ] || die "$1; run apt-get update as root"
  echo "vm/build.sh: $1: running apt-get update"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || die "apt-get update failed"
}
# Images often ship without package lists.
resolve_kernel || { apt_update "apt-cache knows no linux-image-amd64"; resolve_kernel || die "no linux-image-amd64 in apt"; }
KVER=${KPKG#linux-image-}

mkdir -p "$CACHE"
[ -e "$CACHE/.gitignore" ] || echo '*' > "$CACHE/.gitignore"  # git then ignores the whole cache

stamp=$( { cat "$VM_DIR/build.sh" "$VM_DIR/init"; echo "$KPKG $KPKG_VERSION"; } | sha256sum | cut -d' ' -f1)
up_to_date() {
  [ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.cpio.gz" ] && [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$stamp" ]
}
# The stamp is written last, so an up-to-date image needs no lock (a running VM may hold it).
if up_to_date; then echo "vm image up to date: $CACHE ($KVER)"; exit 0; fi
# One build at a time, and none while vm/run.sh boots a VM from this cache (same lock).
exec 9>"$CACHE/.lock"
flock -n 9 || { echo "vm/build.sh: waiting for another build or run using $CACHE"; flock 9; }
if up_to_date; then echo "vm image up to date: $CACHE ($KVER)"; exit 0; fi

start=$EPOCHREALTIME
echo "building the vm image in $CACHE (kernel $KPKG $KPKG_VERSION)"
deb=$CACHE/${KPKG}_${KPKG_VERSION//:/%3a}.deb
if [ ! -f "$deb" ]; then
  rm -f "$CACHE"/linux-image-*.deb  # an older kernel's package, downloaded by an earlier run
  dl=$(mktemp -d "$CACHE/download.XXXXXX")
  # The sandbox user _apt cannot write into the cache when it sits under a root-only home.
  (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KPKG_VERSION") \
    || { rm -rf "$dl"; die "apt-get download $KPKG=$KPKG_VERSION failed (stale package lists? apt-get update)"; }
  mv "$dl"/*.deb "$deb"
  rm -rf "$dl"
fi

work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
kroot=$work/kroot root=$work/initramfs
mkdir -p "$kroot" "$root"

dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" --wildcards "${EXTRACT[@]}"
[ -f "$kroot/boot/vmlinuz-$KVER" ] || die "$deb holds no boot/vmlinuz-$KVER"
# The .deb ships no modules.dep: the package's postinst generates it.
depmod -b "$kroot" "$KVER"

# The module closure, as paths relative to the kernel root.
roots=("${MODULES[@]}")
for glob in "${MODULE_GLOBS[@]}"; do
  for ko in "$kroot/lib/modules/$KVER/"$glob; do roots+=("$(basename "$ko" .ko)"); done
done
modprobe -d "$kroot" -S "$KVER" --show-depends -a "${roots[@]}" \
  | awk '$1 == "insmod" {print $2}' | sort -u | sed "s|^$kroot/||" > "$work/modules.list"

mkdir -p "$root"/{bin,sbin,proc,sys,dev,mnt/host,tmp,lib/modules/"$KVER"}
cp "$BUSYBOX" "$root/bin/busybox"
# `busybox --list` names busybox itself: a self-link there makes /init fail with ELOOP.
for applet in $("$BUSYBOX" --list | grep -vx busybox); do ln -s busybox "$root/bin/$applet"; done
ln -s ../bin/busybox "$root/sbin/modprobe"  # the path the kernel's request_module runs
(cd "$kroot" && cp --parents $(cat "$work/modules.list") "$root/")
cp "$kroot/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$KVER/"
depmod -b "$root" "$KVER"
install -m 0755 "$VM_DIR/init" "$root/init"

(cd "$root" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initramfs.cpio.gz"
cp "$kroot/boot/vmlinuz-$KVER" "$work/vmlinuz"
mv "$work/vmlinuz" "$CACHE/vmlinuz"
mv "$work/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz"
echo "$KVER" > "$CACHE/kernel-version"
echo "$stamp" > "$CACHE/stamp"
echo "vm image built in $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}")s:" \
  "$(wc -l < "$work/modules.list") modules, initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1)"
