#!/bin/sh
# Runs inside the TCG rig (`scripts/rig peer`): the same stock Linux client (1 vCPU, 512 MiB,
# one kernel, one initramfs with Debian's fio) runs the same fio jobs on its virtio-blk disk,
# a raw file of PEER_DISK_MIB MiB on the rig's tmpfs, under
#   (a) ddvm, through an NVMe driver domain (emulated controller) -- peer-a.toml
#   (b) ddvm, served from the file by the VMM (no isolation)       -- peer-b.toml
#   (c) QEMU microvm, virtio-blk with an iothread
#   (d) QEMU microvm, vhost-user-blk to a separate qemu-storage-daemon
# Each round runs every peer once, the order reversed every other round. Then the kill
# rounds: each peer runs fio's long verify job (kill.fio) once without faults, and (a) and
# (d) once more while their backend is killed every second: ddvm's driver domain by
# `ddvm ctl kill`, qemu-storage-daemon by SIGKILL and restarted at once (QEMU's vhost-user
# chardev reconnects). (b) and (c) have no backend outside the VMM process to kill.
#
# Output, for the report (`ddvm-peer-report`): per run
#   peer-run: begin PEER ROUND MODE
#   ddvm-fio: ...            the client's lines (see the client's /init)
#   peer-run: end PEER ROUND MODE {"status":S,"seconds":T,"kills":K,"timed_out":B}
#   peer-cost: PEER ROUND MODE JOB {json}
#                            what one job cost the whole rig (see `snap` below)
# PEER is a..d, MODE is `peer` (the standard jobs), `base` (the kill job without faults)
# or `kill`.
#
# Environment: PEER_ROUNDS (3), PEER_DISK_MIB (64), PEER_QD1_MIB (4), PEER_RAND_MIB (16),
# PEER_KILL_SECONDS (30; 0: no kill rounds), PEER_PEERS (the peers, default "a b c d"),
# PEER_TIMEOUT (seconds a client may take beyond its jobs' own length, default 600).

# Everything this script prints goes through the kernel's log (/dev/kmsg: one record a line,
# on the console at the warning level), not the rig's tty: the kernel writes its console
# synchronously, while a tty written from userspace waits for the UART's interrupt, and in
# the TCG rig interrupts can stop coming (see `scripts/rig`, cmd_peer: the rig's tick). Needs
# the rig's kernel booted with printk.devkmsg=on.
kmsg=0
if [ -w /dev/kmsg ] && grep -q 'printk.devkmsg=on' /proc/cmdline; then
  kmsg=1
  echo 5 >/proc/sys/kernel/printk
  exec >/dev/kmsg 2>&1
fi
# Copies stdin to stdout a line per write (a kernel log record holds one line), at most 50
# lines a second: bursts of console output have frozen the rig (its clock stopped while it
# printed a client's reports, the client already gone).
lines() {
  while IFS= read -r l; do
    echo "$l"
    usleep 20000
  done
}

rounds=${PEER_ROUNDS:-3}
disk_mib=${PEER_DISK_MIB:-64}
qd1_mib=${PEER_QD1_MIB:-4}
rand_mib=${PEER_RAND_MIB:-16}
kill_seconds=${PEER_KILL_SECONDS:-30}
peers=${PEER_PEERS:-a b c d}
slack=${PEER_TIMEOUT:-600}
mem_mib=512

# The client's kernel command line for a run of MODE.
cmdline() {
  local job=peer
  [ "$1" = peer ] || job=kill
  echo "console=ttyS0 quiet panic=-1 ddvm.rounds=0 ddvm.mib=1 ddvm.fio=$job ddvm.fio_qd1_mib=$qd1_mib ddvm.fio_rand_mib=$rand_mib ddvm.fio_seconds=$kill_seconds"
}

# A fresh, sparse backing file.
fresh() {
  rm -f "$1"
  dd if=/dev/zero of="$1" bs=1M count=0 seek="$disk_mib" 2>/dev/null
}

# ddvm's topology PEER (a or b) for MODE, from the shipped peer-PEER.toml.
ddvm_config() {
  sed -e "s|^cmdline = .*|cmdline = \"$(cmdline "$2")\"|" \
    -e "s|^size_mib = .*|size_mib = $disk_mib|" "peer-$1.toml" >"run-$1.toml"
}

# QEMU's machine for (c) and (d): microvm, virtio-mmio found through ACPI as under ddvm, in
# virtio 1.x mode (qemu-storage-daemon's vhost-user-blk refuses legacy virtio-mmio), without the
# PIT and the 8259 PIC (with them, clients froze in the rig's nested KVM at boot).
qemu_common() {
  echo "-M microvm,acpi=on,pit=off,pic=off$1 -accel kvm -cpu host -smp 1 -m $mem_mib -L /work -global virtio-mmio.force-legacy=false -kernel vmlinuz -initrd client.cpio.gz -display none -monitor none -nodefaults -no-reboot"
}

qsd_start() {
  rm -f /tmp/peer-d.sock
  qemu-storage-daemon \
    --blockdev driver=file,node-name=disk0,filename=/tmp/peer-d.img \
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/tmp/peer-d.sock,writable=on,logical-block-size=4096 \
    >>/tmp/qsd.log 2>&1 &
  qsd=$!
  local i=0
  while [ ! -S /tmp/peer-d.sock ] && [ $i -lt 200 ]; do
    sleep 0.05
    i=$((i + 1))
  done
}

# Starts PEER's client (and backend) for MODE in the background: $pid is the process to
# wait for, its console goes to $log.
start() {
  log=/tmp/peer-$1.log
  rm -f "$log" /tmp/peer-ctl.sock
  case $1 in
    a | b)
      fresh "/tmp/peer-$1.img"
      ddvm_config "$1" "$2"
      ddvm run --control /tmp/peer-ctl.sock "run-$1.toml" >"$log" 2>&1 &
      pid=$!
      ;;
    c)
      fresh /tmp/peer-c.img
      # shellcheck disable=SC2046
      qemu-system-x86_64 $(qemu_common "") -append "$(cmdline "$2")" \
        -object iothread,id=io0 \
        -drive id=d,file=/tmp/peer-c.img,format=raw,if=none,aio=threads \
        -device virtio-blk-device,drive=d,iothread=io0,serial=ddvm-linux0,logical_block_size=4096,physical_block_size=4096 \
        -serial "file:$log" >/tmp/peer-qemu.log 2>&1 &
      pid=$!
      ;;
    d)
      fresh /tmp/peer-d.img
      : >/tmp/qsd.log
      qsd_start
      # shellcheck disable=SC2046
      qemu-system-x86_64 $(qemu_common ",memory-backend=mem") -append "$(cmdline "$2")" \
        -object "memory-backend-memfd,id=mem,size=${mem_mib}M,share=on" \
        -chardev socket,id=vu0,path=/tmp/peer-d.sock,reconnect=1 \
        -device vhost-user-blk,chardev=vu0,num-queues=1 \
        -serial "file:$log" >/tmp/peer-qemu.log 2>&1 &
      pid=$!
      ;;
  esac
}

# What a job costs, in counters of the whole rig read when the client starts the job
# (`ddvm-fio: start`) and when fio returns (`ddvm-fio: done`), as seen by polling the client's
# console every 0.2 s: VM exits by kind (KVM's debugfs, every VM of the rig: the client's and,
# under ddvm, the driver domain's), context switches, the CPU's busy and idle time, and the
# CPU time of each thread by name (digits left out: `vcpu-linux-`, `CPU /KVM`; kernel
# threads together as `[kernel]`; a thread that ended before the second reading is missed).
# CPU times are in ticks of 1/100 s.
kvm_stats="exits io_exits mmio_exits halt_exits halt_wakeup irq_injections irq_exits signal_exits"
[ -d /sys/kernel/debug/kvm ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
snap() {
  local stats="" f
  for f in $kvm_stats; do
    [ -r "/sys/kernel/debug/kvm/$f" ] && stats="$stats /sys/kernel/debug/kvm/$f"
  done
  {
    echo "uptime $(cat /proc/uptime)"
    cat /proc/stat
    # shellcheck disable=SC2086
    [ -z "$stats" ] || grep -H . $stats
    cat /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null
  } | awk '
    $1 == "uptime" { printf "centiseconds %d\n", $2 * 100; next }
    $1 == "ctxt" { print "context_switches", $2; next }
    $1 == "cpu" { print "busy_ticks", $2 + $3 + $4 + $7 + $8; print "idle_ticks", $5 + $6; next }
    /^\/sys\// { n = $0; sub(/.*\//, "", n); split(n, kv, ":"); print kv[1], kv[2]; next }
    /^[0-9]+ \(/ {
      # A thread: "TID (COMM) STATE PPID ... UTIME STIME ...", COMM may hold spaces and ")".
      lp = index($0, "("); rp = 0
      for (i = length($0); i > lp; i--) if (substr($0, i, 1) == ")") { rp = i; break }
      comm = substr($0, lp + 1, rp - lp - 1)
      split(substr($0, rp + 2), f, " ")
      if (f[2] == 2 || $1 == 2) comm = "[kernel]"
      gsub(/[0-9"\\]/, "", comm)
      print "t" $1, f[12] + f[13], comm
    }' >"$1"
}

# The difference of two `snap` files as one JSON object: the counters, and `ticks` by thread.
cost() {
  awk '
    NR == FNR { was[$1] = $2; next }
    /^t/ {
      d = $2 - was[$1]; name = $0; sub(/^[^ ]* [^ ]* /, "", name)
      if (d > 0) ticks[name] += d
      next
    }
    { printf "%s\"%s\":%d", (n++ ? "," : "{"), $1, $2 - was[$1] }
    END {
      printf ",\"ticks\":{"; sep = ""
      for (t in ticks) { printf "%s\"%s\":%d", sep, t, ticks[t]; sep = "," }
      print "}}"
    }' "$1" "$2"
}

# Follows the client's console ($log): at each `ddvm-fio: start JOB` and `ddvm-fio: done
# JOB` not seen yet takes a reading, and after a `done` prints the job's `peer-cost` line.
# Sets $job to the job running ("" between jobs).
follow() {
  local n line
  n=$(grep -c 'ddvm-fio: \(start\|done\) ' "$log" 2>/dev/null)
  while [ "${n:-0}" -gt "$seen" ]; do
    seen=$((seen + 1))
    line=$(grep 'ddvm-fio: \(start\|done\) ' "$log" | sed -n "${seen}p")
    case $line in
      *"ddvm-fio: start "*)
        job=${line##* }
        snap /tmp/peer-cost.0
        ;;
      *"ddvm-fio: done "*)
        snap /tmp/peer-cost.1
        echo "peer-cost: $peer $round $mode ${line##* } $(cost /tmp/peer-cost.0 /tmp/peer-cost.1)"
        job=""
        ;;
    esac
  done
}

# The rig's uptime in centiseconds, in $now (no process started: the loop below runs it
# five times a second).
clock() {
  local up rest
  read -r up rest </proc/uptime
  now=${up%.*}${up#*.}
  now=${now#0}
}

# Kills PEER's backend, once; true if it did.
kill_backend() {
  case $1 in
    a) ddvm ctl /tmp/peer-ctl.sock kill nvme0 >/dev/null 2>&1 ;;
    d)
      kill -KILL "$qsd" 2>/dev/null || return 1
      wait "$qsd" 2>/dev/null
      qsd_start
      ;;
    *) return 1 ;;
  esac
}

# One run: PEER ROUND MODE.
run() {
  local peer=$1 round=$2 mode=$3 limit kills=0 timed_out=false t0 t1 status seen=0 job=""
  local now began killed=0
  limit=$slack
  [ "$mode" = peer ] || limit=$((slack + kill_seconds))
  echo "peer-run: begin $peer $round $mode"
  t0=$(date +%s)
  clock
  began=$now
  start "$peer" "$mode"
  while kill -0 "$pid" 2>/dev/null; do
    clock
    if [ $((now - began)) -gt $((limit * 100)) ]; then
      timed_out=true
      kill -KILL "$pid" 2>/dev/null
      break
    fi
    follow
    # In a kill run, the backend is killed every second while the job runs.
    if [ "$mode" = kill ] && [ -n "$job" ]; then
      [ "$killed" -gt 0 ] || killed=$now
      if [ $((now - killed)) -ge 100 ]; then
        kill_backend "$peer" && kills=$((kills + 1))
        killed=$now
      fi
    fi
    sleep 0.2
  done
  wait "$pid"
  status=$?
  t1=$(date +%s)
  [ "$peer" = d ] && kill -KILL "$qsd" 2>/dev/null && wait "$qsd" 2>/dev/null
  # The client's fio lines; a run that printed none shows its last lines instead.
  sed -n 's/.*\(ddvm-fio: \)/\1/p' "$log" | lines
  if ! grep -q 'ddvm-fio: end' "$log"; then
    tail -n 20 "$log" | sed 's/^/peer-run: log /' | lines
    [ "$peer" = d ] && tail -n 5 /tmp/qsd.log | sed 's/^/peer-run: qsd /' | lines
  fi
  # What QEMU said (on stderr: its vhost-user reconnections), counted and its last lines: written
  # to the kernel's log as it came, a burst of them once froze the rig.
  case $peer in
    c | d)
      echo "peer-run: qemu $(grep -c . /tmp/peer-qemu.log) lines of messages"
      grep -v '^ *$' /tmp/peer-qemu.log | tail -n 4 | sed 's/^/peer-run: qemu /' | lines
      ;;
  esac
  echo "peer-run: end $peer $round $mode {\"status\":$status,\"seconds\":$((t1 - t0)),\"kills\":$kills,\"timed_out\":$timed_out}"
  rm -f "/tmp/peer-$peer.img"
}

echo "peer-run: setup {\"rounds\":$rounds,\"disk_mib\":$disk_mib,\"qd1_mib\":$qd1_mib,\"rand_mib\":$rand_mib,\"kill_seconds\":$kill_seconds,\"client_mib\":$mem_mib,\"client_vcpus\":1,\"rig_vcpus\":$(nproc)}"
reversed=$(echo "$peers" | tr ' ' '\n' | sed '1!G;h;$!d' | tr '\n' ' ')
r=1
while [ "$r" -le "$rounds" ]; do
  order=$peers
  [ $((r % 2)) -eq 0 ] && order=$reversed
  for p in $order; do run "$p" "$r" peer; done
  r=$((r + 1))
done
if [ "$kill_seconds" -gt 0 ]; then
  for p in $peers; do
    run "$p" 1 base
    case $p in a | d) run "$p" 1 kill ;; esac
  done
fi
echo "peer-run: done"
# With the output in the kernel's log, the rig's own last words (its init's `rig: exit` on the
# tty) could stall as above: power off here. `scripts/rig peer` looks for `peer-run: done`.
if [ "$kmsg" -eq 1 ]; then
  sync
  poweroff -f
fi
