#!/bin/sh
# Runs inside the TCG rig (tests/rig.rs): the two stock Linux clients of net-linux.toml, a
# serving a file over HTTP and b fetching it, while the NIC domain under them is killed at
# the start of each of b's fetches from the second on, a moment into it: `net-test.sh KILLS`.
# b fetches KILLS + 2 times. Prints ddvm's output, then `net-test: kills N during M` (M: the
# kills that came before b's report, while it was still fetching); exits with ddvm's status.
kills=${1:-3}
truncate -s 8M /tmp/net-a.img /tmp/net-b.img
: >/tmp/ddvm.log
sed -i "s/ddvm.fetches=[0-9]*/ddvm.fetches=$((kills + 2))/" net-linux.toml
ddvm run net-linux.toml --control /tmp/ddvm.sock >/tmp/ddvm.log 2>&1 &
pid=$!
done_kills=0
during=0
f=1
k=0
while [ $k -lt "$kills" ]; do
  k=$((k + 1))
  f=$((f + 1))
  i=0
  until grep -q "ddvm-net: fetch $f\$" /tmp/ddvm.log; do
    kill -0 $pid 2>/dev/null || break 2
    i=$((i + 1))
    [ $i -lt 600 ] || break 2
    sleep 0.5
  done
  sleep 0.3
  if ddvm ctl /tmp/ddvm.sock kill nic0 >/dev/null; then
    done_kills=$((done_kills + 1))
    grep -q 'ddvm-net: {' /tmp/ddvm.log || during=$((during + 1))
  fi
done
wait $pid
status=$?
cat /tmp/ddvm.log
echo "net-test: kills $done_kills during $during"
exit $status
