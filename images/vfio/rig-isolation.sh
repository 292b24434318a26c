#!/bin/sh
# Runs inside the TCG rig (`scripts/rig run --iommu --nvme ...`, tests/rig.rs): binds the
# rig's first NVMe controller to vfio-pci and runs `ddvm isolation` on it, then its negative
# control, then shows the kernel's IOMMU fault reports; exits non-zero if either failed.
set -u
a=${RIG_NVME%% *}
ddvm device bind "$a" >/dev/null || exit 2
ddvm isolation "$a"
first=$?
ddvm isolation "$a" --control
control=$?
dmesg | grep 'DMAR: \[DMA' | sed 's/^/rig-isolation: kernel: /'
echo "rig-isolation: status $first control $control"
[ $first -eq 0 ] && [ $control -eq 0 ]
