#!/usr/bin/env bash
# Installs what tern needs on a fresh Debian 12 machine (idempotent):
#   QEMU 10 from bookworm-backports (Debian's 7.2 loses dirty pages in live migration under
#   TCG), the guest-build inputs (busybox-static, cpio, gcc), network tools (iproute2, ping,
#   iptables, socat, tcpdump), e2fsprogs (test and demo disks), debootstrap (the package test's clean Debian root), dosfstools, mtools, syslinux, ovmf and systemd-boot-efi (disk images SeaBIOS and UEFI boot) and swtpm (the software TPM behind a VM spec's `tpm = true`),
#   libvirt 11 from bookworm-backports (libvirtd, its QEMU driver and virsh, no recommends:
#   no default network; for `tern migrate --libvirt` and its tests),
#   etcd-server (the controller's etcd store and its tests; its packaged service is left
#   stopped and disabled: the tests start their own etcd),
#   and the system user `tern-qemu` that QEMU runs as.
# Run as root. Safe to run again: it only installs what is missing.
set -euo pipefail
need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then need_qemu=1
elif ! qemu-system-x86_64 --version | grep -q 'version 10\.'; then need_qemu=1
elif ! command -v qemu-nbd >/dev/null 2>&1; then need_qemu=1; fi  # qemu-utils: qemu-img, qemu-nbd (disks)
need_libvirt=0
if ! command -v virsh >/dev/null 2>&1 || [ ! -x /usr/sbin/libvirtd ]; then need_libvirt=1
elif ! dpkg-query -W -f='${Version}' libvirt-daemon-driver-qemu 2>/dev/null | grep -q '^11\.'; then need_libvirt=1; fi
pkgs=(busybox-static cpio gcc libc6-dev iproute2 iputils-ping iptables socat swtpm swtpm-tools tcpdump e2fsprogs debootstrap dosfstools mtools syslinux syslinux-common ovmf systemd-boot-efi etcd-server)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
if [ "$need_qemu" = 1 ] || [ "$need_libvirt" = 1 ] || [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ]; then
    src=/etc/apt/sources.list.d/debian.sources
    [ -f "$src" ] || { echo "setup: $src not found; add bookworm-backports by hand" >&2; exit 1; }
    # the first stanza of the bookworm entry, with only the Suites line changed
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$src" | sed 's/^Suites:.*/Suites: bookworm-backports/' \
      > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  apt-get update -qq
  [ "${#missing[@]}" -gt 0 ] && apt-get install -y -qq "${missing[@]}"
  # The package may start its own etcd (port 2379, /var/lib/etcd): stop and disable it once,
  # when it is installed here; tests run their own etcd on free ports.
  if printf '%s\n' "${missing[@]}" | grep -qx etcd-server; then
    if [ -d /run/systemd/system ]; then
      systemctl disable --now etcd >/dev/null 2>&1 || true
    else
      if [ -x /etc/init.d/etcd ]; then /etc/init.d/etcd stop >/dev/null 2>&1 || true; fi
      update-rc.d etcd disable >/dev/null 2>&1 || true
    fi
  fi
  if [ "$need_qemu" = 1 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
  fi
  if [ "$need_libvirt" = 1 ]; then
    # only these three from backports (not the rest of libvirt's dependencies)
    apt-get install -y -qq --no-install-recommends libvirt-daemon/bookworm-backports \
      libvirt-daemon-driver-qemu/bookworm-backports libvirt-clients/bookworm-backports
  fi
fi
# The unprivileged user every QEMU runs as (tern agent --qemu-user; kvm group for KVM).
if ! id -u tern-qemu >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tern-qemu
fi
if getent group kvm >/dev/null 2>&1 && ! id -nG tern-qemu | grep -qw kvm; then
  usermod -a -G kvm tern-qemu
fi
# Post-copy (tern migrate --postcopy): the destination QEMU, running as tern-qemu, needs
# userfaultfd; /dev/userfaultfd (Linux 6.1+) for its group only, nothing system-wide.
# (the udev rule keeps it across reboots where udev runs; this machine may have none)
if [ -c /dev/userfaultfd ]; then
  if [ -d /etc/udev/rules.d ]; then
    cp "$(dirname "$0")/../packaging/udev/70-tern-userfaultfd.rules" /etc/udev/rules.d/
  fi
  chgrp tern-qemu /dev/userfaultfd && chmod 660 /dev/userfaultfd
fi
qemu-system-x86_64 --version | head -1
