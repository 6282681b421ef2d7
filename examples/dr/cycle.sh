#!/usr/bin/env bash
# The whole disaster-recovery cycle of examples/dr on one machine (issue 18), in one
# command: snapshot, replicate, lose site east, fail over to west, check the data,
# fail back, and the figures (RPO achieved, RTO of the failover, bytes shipped per
# delta).
#
#   examples/dr/cycle.sh                      # east-1 on 127.0.0.21, west-1 on 127.0.0.22
#   EAST=127.0.0.76:7100 WEST=127.0.0.77:7100 examples/dr/cycle.sh
#
# It needs /dev/kvm (db's built-in guest runs), qemu-img, and the cairn, cairn-node
# and cairn-vmm binaries side by side (CAIRN=path/to/cairn; default: cairn on PATH,
# else target/debug/cairn). It works on a copy of the specs in a scratch directory,
# which `dev down` empties and the script removes at the end.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [[ -z "${CAIRN:-}" ]]; then
    if command -v cairn >/dev/null; then CAIRN=cairn; else CAIRN="$root/target/debug/cairn"; fi
fi
EAST=${EAST:-127.0.0.21:7100}
WEST=${WEST:-127.0.0.22:7100}
work=$(mktemp -d "${TMPDIR:-/tmp}/cairn-dr-XXXXXX")
cp "$here"/*.kdl "$work"/
sed -i "s/127.0.0.21:7100/$EAST/; s/127.0.0.22:7100/$WEST/" "$work/cluster.kdl"
cd "$work"
cleanup() {
    "$CAIRN" dev down . >/dev/null 2>&1 || true
    cd / && rm -rf "$work"
}
trap cleanup EXIT
ms() { date +%s%3N; }
step() { printf '\n== %s\n' "$*"; }
crc() { "$CAIRN" vm disk-io db checksum . --disk data --offset "$1" --length "$2" | sed -n 's/^crc32c //p'; }

step "two sites on loopback; db runs at east, its disk replicated to west every second"
"$CAIRN" dev up .
"$CAIRN" apply . --auto-approve

step "db's guest writes 192 KiB at east (across a stripe unit's end)"
"$CAIRN" vm disk-io db write-pattern . --disk data --offset 960KiB --length 192KiB --seed 7
first=$(crc 960KiB 192KiB)
written=$(ms)

step "wait until a snapshot taken after the write is at west"
until "$CAIRN" volume snapshots db/data . --format json |
    grep -o '"name": *"auto-[0-9]*"' | sed 's/[^0-9]//g' |
    awk -v w="$written" '$1 > w { found = 1 } END { exit !found }' \
    && "$CAIRN" status . --format json | grep -q '"last_replicated": *"auto-'; do
    sleep 0.5
done
"$CAIRN" status . | sed -n '/^replication:/,$p'

step "bytes shipped per delta so far (east-1's log; the guest also wrote 4 KiB at boot, its block self-test)"
grep -o 'snapshot auto-[0-9]* (base [^)]*) to [^:]*:[^:]*: [0-9]* data + [0-9]* zero bytes ([0-9]* on the wire)' \
    .cairn/dev/east-1/node.log | tee deltas.txt || true
awk '{ d += $(NF-9); z += $(NF-6); n++ } END { printf "%d deltas: %d data + %d zero bytes in all\n", n, d, z }' deltas.txt

step "site east is lost: east-1 and db's VMM, kill -9"
east_pid=$(sed -n 's/.*"east-1": *\([0-9]*\).*/\1/p' .cairn/dev/pids.json)
lost=$(ms)
kill -s KILL -- "-$east_pid"
while kill -0 "$east_pid" 2>/dev/null; do sleep 0.05; done

step "cairn failover --site east"
out=$("$CAIRN" failover --site east .)
echo "$out"
point=$(grep -o 'from auto-[0-9]*' <<<"$out" | head -1 | sed 's/from auto-//')
rto=$(grep -o '[0-9]* ms after the command started' <<<"$out" | head -1 | cut -d' ' -f1)

step "the data at west is the source's at its last replicated snapshot"
[[ $(crc 960KiB 192KiB) == "$first" ]] && echo "crc32c $first: intact"

step "db writes 128 KiB at west; east-1 returns"
"$CAIRN" vm disk-io db write-pattern . --disk data --offset 5MiB --length 128KiB --seed 9
second=$(crc 5MiB 128KiB)
"$CAIRN" dev up .
"$CAIRN" apply . --auto-approve

step "cairn failback --site east"
back=$("$CAIRN" failback --site east .)
echo "$back"
[[ $(crc 960KiB 192KiB) == "$first" && $(crc 5MiB 128KiB) == "$second" ]] &&
    echo "crc32c $first and $second at east: intact"
"$CAIRN" apply . --auto-approve

step "figures"
echo "RPO achieved: $((lost - point)) ms (the loss at $lost, db came back from the snapshot of $point)"
echo "RTO of the failover: $rto ms (from the command to db running and healthy at west)"
grep -o 'shipped as a delta from [^;]*' <<<"$back" | sed 's/^/failback delta: /'
