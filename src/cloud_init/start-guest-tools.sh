#!/bin/sh
# qemu-worker: installs and starts the guest tools that this VM's worker serves, so that a
# stock cloud image runs a job with no change. POSIX sh with what stock images carry
# (curl, wget or python3; sha256sum or python3). See docs/images.md.
set -eu
url=@URL@
sha256=@SHA256@
bin=/usr/local/sbin/qemu-worker-guest
unit=/etc/systemd/system/qemu-worker-guest.service
say() { echo "qemu-worker: $*"; echo "qemu-worker: $*" > /dev/console 2>/dev/null || true; }

# Two instances would both run the task: an image with tools of its own keeps them.
for f in /usr/bin/qemu-worker-guest /usr/local/bin/qemu-worker-guest "$bin" \
         /lib/systemd/system/qemu-worker-guest.service "$unit"; do
  if [ -e "$f" ]; then say "the image has its own guest tools ($f); leaving them"; exit 0; fi
done

tmp=$(mktemp /tmp/qemu-worker-guest.XXXXXX)
trap 'rm -f "$tmp"' EXIT
fetched=
for try in 1 2 3 4 5; do
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o "$tmp" "$url" && fetched=curl && break
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$tmp" "$url" && fetched=wget && break
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$url" "$tmp" && fetched=python3 && break
  else
    say "cannot fetch the guest tools: the image has none of curl, wget and python3"; exit 1
  fi
  sleep "$try"
done
[ -n "$fetched" ] || { say "cannot fetch the guest tools from $url"; exit 1; }

if command -v sha256sum >/dev/null 2>&1; then
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
else
  got=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$tmp")
fi
if [ "$got" != "$sha256" ]; then
  say "the guest tools from $url have sha256 $got, not $sha256: not starting them"; exit 1
fi
mkdir -p "$(dirname "$bin")"
cp "$tmp" "$bin.new" && chmod 0755 "$bin.new" && mv -f "$bin.new" "$bin"

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  # After cloud-final: the task runs once every part of the user-data has run, and a
  # boot snapshot is taken with cloud-init done.
  cat > "$unit" <<UNIT
[Unit]
Description=qemu-worker guest tools (installed by cloud-init from the worker)
After=cloud-final.service network-online.target
Wants=network-online.target

[Service]
ExecStart=$bin
StandardOutput=journal+console
StandardError=journal+console
KillMode=process
UNIT
  systemctl daemon-reload
  systemctl start --no-block qemu-worker-guest.service
  say "guest tools installed ($fetched, sha256 $sha256) and queued after cloud-final"
else
  nohup "$bin" > /dev/console 2>&1 &
  say "guest tools installed ($fetched, sha256 $sha256) and started (no systemd)"
fi
