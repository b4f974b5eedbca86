#!/usr/bin/env bash
# Unpacks Debian bookworm's QEMU 7.2 into .cache/qemu-7.2/ (a private prefix, next to the
# system's QEMU 10) and prints the path of a wrapper that runs it. Cached; idempotent.
# 7.2 is used for its stream format and for paused migrations only: it loses dirty pages
# in live migration under TCG (fixed upstream in 9.0).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cache/qemu-7.2"
wrapper="$dir/qemu-system-x86_64"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then echo "$wrapper"; exit 0; fi
mkdir -p "$dir/debs"
exec 9>"$dir/.lock"; flock 9
ver=$(apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '$2 ~ /7\.2/ && $3 ~ /bookworm\/main/ {gsub(/ /,"",$2); print $2; exit}')
if [ -z "$ver" ]; then apt-get update -qq; ver=$(apt-cache madison qemu-system-x86 | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /,"",$2); print $2; exit}'); fi
[ -n "$ver" ] || { echo "qemu72.sh: no QEMU 7.2 in the apt sources" >&2; exit 1; }
data_ver=$(apt-cache madison qemu-system-data | awk -F'|' '$2 ~ /7\.2/ {gsub(/ /,"",$2); print $2; exit}')
# qemu-system-common carries the accelerator modules (accel-tcg-x86_64.so)
(cd "$dir/debs" && apt-get download "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-system-data=$data_ver" >/dev/null 2>&1)
rm -rf "$dir/root"; mkdir -p "$dir/root"
for d in "$dir"/debs/*.deb; do dpkg -x "$d" "$dir/root"; done
bin="$dir/root/usr/bin/qemu-system-x86_64"
# Libraries 7.2 links against that this host lacks (QEMU 10's deps cover most).
missing=$(ldd "$bin" | awk '/not found/{print $1}')
if [ -n "$missing" ]; then
  pkgs=()
  for l in $missing; do
    p=$(apt-cache search --names-only "^$(echo "$l" | sed 's/\.so\.\([0-9]*\).*/\1/; s/[._]//g')" 2>/dev/null | head -1 | cut -d' ' -f1)
    [ -n "$p" ] && pkgs+=("$p")
  done
  echo "qemu72.sh: $bin needs $missing (${pkgs[*]:-no package found})" >&2
  exit 1
fi
cat > "$wrapper" <<W
#!/bin/sh
QEMU_MODULE_DIR="$dir/root/usr/lib/x86_64-linux-gnu/qemu" exec "$bin" -L "$dir/root/usr/share/qemu" -L /usr/share/seabios -L /usr/share/qemu "\$@"
W
chmod +x "$wrapper"
"$wrapper" --version | head -1 >&2
echo "$wrapper"
