#!/bin/sh
# Runs inside the TCG rig (tests/rig.rs): the stock Linux client of linux-client.toml writes
# and verifies its disk while a fault is injected into the NVMe driver domain under it at the
# start of each of its I/O rounds from the second on: `rig-test.sh FAULT...` (`ddvm ctl`
# fault names; `kill` needs no fault-injection build). The client runs two rounds more than
# there are faults. Prints ddvm's output, then `rig-test: faults N`; exits with ddvm's status.
sed -i "s/ddvm.seconds=[0-9]*/ddvm.seconds=0 ddvm.rounds=$(($# + 2))/" linux-client.toml
ddvm run linux-client.toml --control /tmp/ddvm.sock >/tmp/ddvm.log 2>&1 &
pid=$!
faults=0
r=1
for fault in "$@"; do
  r=$((r + 1))
  i=0
  until grep -q "ddvm-linux: round $r" /tmp/ddvm.log; do
    kill -0 $pid 2>/dev/null || break 2
    i=$((i + 1))
    [ $i -lt 600 ] || break 2
    sleep 0.5
  done
  if [ "$fault" = kill ]; then
    ddvm ctl /tmp/ddvm.sock kill nvme0 >/dev/null && faults=$((faults + 1))
  else
    ddvm ctl /tmp/ddvm.sock inject nvme0 "$fault" >/dev/null && faults=$((faults + 1))
  fi
done
wait $pid
status=$?
cat /tmp/ddvm.log
echo "rig-test: faults $faults"
exit $status
