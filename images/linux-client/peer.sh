#!/bin/sh
# Runs inside the TCG rig (`scripts/rig peer`): the same stock Linux client times the same I/O
# on its virtio-blk disk under
#   (a) ddvm, through an NVMe driver domain,
#   (b) ddvm, served from a file by the VMM (no isolation),
#   (c) QEMU (microvm: virtio-blk on virtio-mmio found through ACPI, as under ddvm), from a file.
# Prints one `peer: SIDE {json}` line per side (the client's report).
report() {
  line=$(grep -a "ddvm-linux: {" "$2" | tail -1)
  echo "peer: $1 ${line#*ddvm-linux: }"
}
for side in a b; do
  ddvm run peer-$side.toml >/tmp/peer-$side.log 2>&1 || cat /tmp/peer-$side.log
  report $side /tmp/peer-$side.log
done
dd if=/dev/zero of=/tmp/peer-c.img bs=1M count=0 seek=64 2>/dev/null
qemu-system-x86_64 -M microvm,acpi=on -accel kvm -cpu host -smp 1 -m 256 -L /work \
  -kernel vmlinuz -initrd client.cpio.gz \
  -append "console=ttyS0 quiet panic=-1 $(sed -n 's/^cmdline = "\(.*\)"/\1/p' peer-b.toml | sed 's/console=ttyS0 quiet panic=-1 //')" \
  -drive id=d,file=/tmp/peer-c.img,format=raw,if=none \
  -device virtio-blk-device,drive=d,serial=ddvm-linux0,logical_block_size=4096,physical_block_size=4096 \
  -serial file:/tmp/peer-c.log -display none -monitor none -nodefaults -no-reboot ||
  cat /tmp/peer-c.log
report c /tmp/peer-c.log
