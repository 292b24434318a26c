#!/bin/sh
# Runs inside the TCG rig (`scripts/rig run --smp 1 --iommu --nvme ...`, tests/rig.rs), on the
# rig's first NVMe controller bound to vfio-pci:
# 1. ddvm holding the device is killed with SIGKILL: bus mastering must read off afterwards
#    (the kernel's release of the device), a second ddvm meanwhile is refused the device in
#    use with one line, and a third run reopens it and verifies I/O through it.
# 2. The stock Linux client of linux-client.toml, its disk served by a driver domain that has
#    the controller by VFIO, killed three times under its I/O (rig-test.sh).
set -u
a=${RIG_NVME%% *}
ddvm device bind "$a" >/dev/null || exit 2
command_register() { od -An -tx2 -j4 -N2 "/sys/bus/pci/devices/$a/config" | tr -d ' '; }
cat >hold.toml <<TOML
[[domain]]
name = "hold"
memory_mib = 32
channel_kib = 8448
[domain.device]
kind = "vfio"
address = "$a"
TOML
ddvm run hold.toml --verify 300 >/tmp/hold.log 2>&1 &
pid=$!
i=0
until grep -q "verify:" /tmp/hold.log; do
  i=$((i + 1))
  [ $i -lt 240 ] || break
  sleep 0.5
done
grep "verify:" /tmp/hold.log | sed 's/^/rig-linux: held: /'
echo "rig-linux: command register while held: $(command_register)"
# The device's MSI-X messages, as the rig's kernel took them for VFIO (each one a wake-up of
# the domain through its eventfd).
awk '/vfio-msix/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i }
  END { print "rig-linux: device interrupts while held: " n + 0 }' /proc/interrupts
ddvm run hold.toml --verify 10 --duration 1 >/tmp/second.log 2>&1
echo "rig-linux: a second ddvm while held: status $? $(grep -m1 'Error\|error' /tmp/second.log)"
kill -9 $pid
wait $pid 2>/dev/null
echo "rig-linux: command register after SIGKILL: $(command_register)"
ddvm run hold.toml --verify 300 --duration 1 >/tmp/third.log 2>&1
echo "rig-linux: reopened after SIGKILL: status $? $(grep 'verify:' /tmp/third.log)"
# The Linux client's topology with the controller by VFIO instead of the emulated model.
awk -v a="$a" '
  /^\[domain.device\]/ { print; print "kind = \"vfio\""; print "address = \"" a "\""; print "reset = \"controller\""; skip = 1; next }
  /^\[/ { skip = 0 }
  skip && /^(kind|backing|size_mib|lba_size|volatile_write_cache) / { next }
  { print }
' linux-client.toml >linux-vfio.toml && mv linux-vfio.toml linux-client.toml
grep -A4 '^\[domain.device\]' linux-client.toml | sed 's/^/rig-linux: /'
exec sh rig-test.sh kill kill kill
