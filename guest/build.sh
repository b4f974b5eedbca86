#!/usr/bin/env bash
# Builds tern's test guest reproducibly from Debian packages: the Debian cloud kernel
# (unpacked from its .deb) and a busybox initramfs with tern's workloads (guest/init,
# guest/src/*.c). The kernel has ext4 built in; virtio_blk (a module) goes into the
# initramfs with the other virtio modules. Cached in .cache/guest/<hash of inputs>/;
# rebuilt when an input changes.
# Last two lines of output: kernel=PATH and initrd=PATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache="$root/.cache/guest"
mkdir -p "$cache/debs"
exec 9>"$cache/.lock"
flock 9

need=()
for p in busybox-static cpio gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The concrete kernel package behind linux-image-cloud-amd64.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/{print $2}')
[ -n "$kpkg" ] && [ -n "$kver" ] || { echo "guest/build.sh: cannot find the Debian cloud kernel package" >&2; exit 1; }

key=$( { echo "$kpkg=$kver"; cat "$here/build.sh" "$here/init" "$here"/src/*.c; dpkg-query -W -f='${Version}' busybox-static; } | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/initrd.gz" ] && [ -f "$out/vmlinuz" ]; then
  echo "guest: cached ($kpkg $kver, key $key)"
else
  echo "guest: building ($kpkg $kver, key $key)"
  deb=$(ls "$cache/debs/${kpkg}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache/debs" && apt-get download "$kpkg=$kver" >/dev/null 2>&1)
    deb=$(ls "$cache/debs/${kpkg}_"*.deb | head -1)
  fi
  tmp=$(mktemp -d "$cache/tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  dpkg -x "$deb" "$tmp/k"
  kmod=$(ls -d "$tmp"/k/lib/modules/*/kernel | head -1)
  r="$tmp/root"
  mkdir -p "$r"/{bin,dev,proc,sys,tmp,run,lib/modules}
  cp /bin/busybox "$r/bin/busybox"
  gcc -O2 -static -o "$r/bin/tern-dirty" "$here/src/dirty.c"
  gcc -O2 -static -o "$r/bin/tern-pattern" "$here/src/pattern.c"
  gcc -O2 -static -o "$r/bin/tern-realistic" "$here/src/realistic.c"
  gcc -O2 -static -o "$r/bin/tern-tpmpcr" "$here/src/tpmpcr.c"
  gcc -O2 -static -o "$r/bin/tern-disk" "$here/src/disk.c"
  cp "$here/init" "$r/init"; chmod 755 "$r/init"
  for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
           drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/core/failover \
           drivers/net/net_failover drivers/net/virtio_net drivers/block/virtio_blk; do
    b=$(basename $m)
    if [ -f "$kmod/$m.ko" ]; then cp "$kmod/$m.ko" "$r/lib/modules/$b.ko"
    elif [ -f "$kmod/$m.ko.xz" ]; then xz -dc "$kmod/$m.ko.xz" > "$r/lib/modules/$b.ko"
    fi
  done
  find "$r" -exec touch -h -d @0 {} +
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --reproducible 2>/dev/null | gzip -9n > "$tmp/initrd.gz")
  mkdir -p "$tmp/out"
  cp "$tmp"/k/boot/vmlinuz-* "$tmp/out/vmlinuz"
  mv "$tmp/initrd.gz" "$tmp/out/initrd.gz"
  rm -rf "$out"; mv "$tmp/out" "$out"
fi
ln -sfn "$key" "$cache/current"
echo "kernel=$out/vmlinuz"
echo "initrd=$out/initrd.gz"
