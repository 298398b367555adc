#!/usr/bin/env bash
# 2 nodes x 2 processes (two network namespaces, run as root) vs 1 node x 4 processes: same losses.
# Usage: bash benchmarks/two_node_losses.sh
set -e
cd "$(dirname "$0")/.."
ip netns del mA 2>/dev/null || true; ip netns del mB 2>/dev/null || true
ip netns add mA; ip netns add mB
ip link add ds9 netns mA type veth peer name ds9 netns mB
ip -n mA addr add 10.213.9.1/24 dev ds9; ip -n mB addr add 10.213.9.2/24 dev ds9
for n in mA mB; do ip -n $n link set ds9 up; ip -n $n link set lo up; done
printf "10.213.9.1 slots=2\n10.213.9.2 slots=2\n" > /tmp/hostfile2
export GLOO_SOCKET_IFNAME=ds9
CFG=examples/configs/zero2_fp32.json
ip netns exec mB deepshard -H /tmp/hostfile2 --node_rank 1 --master_addr 10.213.9.1 --master_port 29611 examples/train_gpt.py --deepspeed_config $CFG --steps 20 --save_dir /tmp/ck2x2 --loss_log /tmp/loss_2x2_b.json > /tmp/nodeB.log 2>&1 &
ip netns exec mA deepshard -H /tmp/hostfile2 --node_rank 0 --master_addr 10.213.9.1 --master_port 29611 examples/train_gpt.py --deepspeed_config $CFG --steps 20 --save_dir /tmp/ck2x2 --loss_log /tmp/loss_2x2.json > /tmp/nodeA.log 2>&1
wait
ip netns del mA; ip netns del mB
unset GLOO_SOCKET_IFNAME
deepshard --num_procs 4 examples/train_gpt.py --deepspeed_config $CFG --steps 20 --save_dir /tmp/ck1x4 --loss_log /tmp/loss_1x4.json > /tmp/1x4.log 2>&1
python - <<'P'
import json
a=json.load(open('/tmp/loss_2x2.json')); b=json.load(open('/tmp/loss_1x4.json'))
print("2x2 world", a["world_size"], "1x4 world", b["world_size"])
print("2x2:", " ".join(f"{x:.4f}" for x in a["losses"]))
print("1x4:", " ".join(f"{x:.4f}" for x in b["losses"]))
print("max abs diff:", max(abs(x-y) for x,y in zip(a["losses"], b["losses"])))
P
