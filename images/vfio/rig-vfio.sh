#!/bin/sh
# Runs inside the TCG rig (`scripts/rig run --iommu --nvme ...`, tests/rig.rs): binds every
# NVMe controller of the rig ($RIG_NVME) to vfio-pci, checks the host, writes a topology with
# one driver domain per controller (passed through VFIO) and two verifying clients on each,
# and runs `ddvm "$@" vfio.toml` on it (e.g. `chaos --faults kill --no-baseline`).
# Prints `rig-vfio: ...` lines about the devices after the run; exits with ddvm's status.
set -u
[ -n "${RIG_NVME:-}" ] || { echo "rig-vfio: no NVMe controller in the rig (--nvme)"; exit 2; }
ddvm device bind $RIG_NVME || exit 2
ddvm check $RIG_NVME || exit 2
# Reset methods, one per controller in turn (default: the first `controller`, the next
# `flr`, and so on), so one run measures both.
resets=${RIG_RESET:-controller flr}
mib=${RIG_DISK_MIB:-64}
half=$((mib / 2))
n=0
: >vfio.toml
for a in $RIG_NVME; do
  reset=$(echo "$resets" | awk -v n=$n '{ print $(n % NF + 1) }')
  cat >>vfio.toml <<TOML
[[domain]]
name = "nvme$n"
memory_mib = 32
channel_kib = 8448
[domain.device]
kind = "vfio"
address = "$a"
reset = "$reset"
[domain.recovery]
heartbeat_ms = 200
request_deadline_ms = 4000
restart_delay_ms = 1
restart_delay_cap_ms = 50
max_restarts = 1000
window_ms = 10000

[[client]]
name = "c${n}a"
disk = "nvme$n"
offset_mib = 0
size_mib = $half
memory_mib = 16
workload = "workload=randrw rwmix=60 bs=4096 qd=8 count=${RIG_COUNT:-600} flush_every=32 id=$((2 * n)) seed=$((n + 1))"

[[client]]
name = "c${n}b"
disk = "nvme$n"
offset_mib = $half
size_mib = $half
memory_mib = 16
workload = "workload=randrw rwmix=40 bs=4096 qd=8 count=${RIG_COUNT:-600} flush_every=32 id=$((2 * n + 1)) seed=$((n + 7))"

TOML
  n=$((n + 1))
done
if [ -n "${RIG_EMULATED:-}" ]; then
  # The emulated controller beside them, for numbers from the same run.
  cat >>vfio.toml <<TOML
[[domain]]
name = "emu0"
memory_mib = 32
channel_kib = 8448
[domain.device]
kind = "emulated-nvme"
backing = "/tmp/emu0.img"
size_mib = $mib
lba_size = 4096
[domain.recovery]
heartbeat_ms = 200
request_deadline_ms = 4000
restart_delay_ms = 1
restart_delay_cap_ms = 50
max_restarts = 1000
window_ms = 10000

[[client]]
name = "emu0a"
disk = "emu0"
offset_mib = 0
size_mib = $half
memory_mib = 16
workload = "workload=randrw rwmix=60 bs=4096 qd=8 count=${RIG_COUNT:-600} flush_every=32 id=40 seed=40"

TOML
fi
ddvm "$@" vfio.toml
status=$?
for a in $RIG_NVME; do
  cmd=$(od -An -tx2 -j4 -N2 /sys/bus/pci/devices/$a/config | tr -d ' ')
  echo "rig-vfio: $a command register after the run: $cmd"
done
exit $status
