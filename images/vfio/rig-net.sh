#!/bin/sh
# Runs inside the TCG rig (`scripts/rig run --smp 1 --iommu --e1000 ... --e1000 ...`,
# tests/rig.rs): the two stock Linux clients of net-linux.toml with both NIC domains given the
# rig's two QEMU e1000s by VFIO instead of emulated ones. Client a (the server) is nic0's,
# client b (the fetcher) nic1's: the file crosses the wire between the two real NICs (a QEMU
# hub, inside the rig), while nic0's domain is killed at each of b's fetches from the second
# on (net-test.sh). `rig-net.sh KILLS`.
set -u
kills=${1:-3}
set -- $RIG_E1000
[ $# -ge 2 ] || { echo "rig-net: expected two e1000s in RIG_E1000, got '$RIG_E1000'"; exit 2; }
for a in "$1" "$2"; do
  ddvm device bind "$a" >/dev/null || exit 2
done
# nic0 and nic1 are the VFIO devices (their wire is the rig's hub: no `wire` key); b moves to
# nic1.
awk -v a0="$1" -v a1="$2" '
  /^\[domain.device\]/ { n++; print; print "kind = \"vfio\""; print "address = \"" (n == 1 ? a0 : a1) "\""; print "reset = \"controller\""; skip = 1; next }
  /^\[/ { skip = 0; client = ($0 == "[[client]]") }
  skip && /^(kind|wire) / { next }
  client && /^name = / { name = $3 }
  client && name == "\"b\"" && /^nic = / { print "nic = \"nic1\""; next }
  { print }
' net-linux.toml >net-vfio.toml && mv net-vfio.toml net-linux.toml
grep -A3 '^\[domain.device\]' net-linux.toml | sed 's/^/rig-net: /'
grep '^nic = ' net-linux.toml | sed 's/^/rig-net: /'
# The VFIO attach and quiesce lines, and each recovery with its time.
export DDVM_LOG=warn,ddvm_passthrough::vfio=info,ddvm::reincarnation=info
# The e1000s' interrupts as the rig's kernel takes them for VFIO (each a wake-up of a domain),
# sampled while ddvm runs: the line goes when ddvm closes the device.
(while :; do
  awk '/vfio-intx/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i }
    END { if (n) print n }' /proc/interrupts >/tmp/intx.new 2>/dev/null
  [ -s /tmp/intx.new ] && mv /tmp/intx.new /tmp/intx
  sleep 2
done) &
sampler=$!
sh net-test.sh "$kills"
status=$?
kill $sampler 2>/dev/null
echo "rig-net: device interrupts (INTx, both NICs) while ddvm ran: $(cat /tmp/intx 2>/dev/null || echo 0)"
exit $status
