#!/bin/sh
# Runs inside the TCG rig (tests/rig.rs): the stock Linux client of linux-client.toml writes
# and verifies its disk while the NVMe driver domain under it is killed three times, each
# time once the client has started a new round of I/O. Prints ddvm's output, then
# `rig-test: kills N`; exits with ddvm's status.
ddvm run linux-client.toml --control /tmp/ddvm.sock >/tmp/ddvm.log 2>&1 &
pid=$!
kills=0
for r in 2 4 6; do
  i=0
  until grep -q "ddvm-linux: round $r" /tmp/ddvm.log; do
    kill -0 $pid 2>/dev/null || break 2
    i=$((i + 1))
    [ $i -lt 600 ] || break 2
    sleep 0.5
  done
  ddvm ctl /tmp/ddvm.sock kill nvme0 >/dev/null && kills=$((kills + 1))
done
wait $pid
status=$?
cat /tmp/ddvm.log
echo "rig-test: kills $kills"
exit $status
