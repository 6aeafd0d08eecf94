#!/usr/bin/env bash
# The sockmap relay experiment of issue 15, reproducible: keep-alive req/s (wrk, 64 conns)
# and iperf3 throughput through l4lb (relay: auto) and through a kernel-only sockmap relay
# (relay.bpf.c + proxy.py), same backends, interleaved rounds. Needs root (BPF). Installs
# clang, libbpf-dev, bpftool, wrk, iperf3, nginx if missing; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
need=()
for tool in clang bpftool wrk iperf3 nginx; do command -v $tool >/dev/null || need+=($tool); done
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release -p l4lb
work=$(mktemp -d /tmp/l4lb-sockmap.XXXXXX)
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# bpffs refuses names with a dot.
pins=/sys/fs/bpf/l4lb_sockmap_$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Bounded: what has not ended after 5 s is killed.
  for _ in $(seq 50); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$pins" "$pins-maps" "$work"
}
trap cleanup EXIT

clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu \
  -c benches/sockmap/relay.bpf.c -o "$work/relay.bpf.o"
mkdir -p "$pins-maps"
bpftool prog loadall "$work/relay.bpf.o" "$pins" type sk_skb pinmaps "$pins-maps"
bpftool prog attach pinned "$pins/relay" stream_verdict pinned "$pins-maps/sockets"

cat > "$work/backend.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.log warn;
events { worker_connections 4096; }
http { keepalive_requests 1000000;
  server { listen 127.0.0.1:18281; access_log off; location / { return 200 'hello\n'; } }
  server { listen 127.0.0.1:18282; access_log off; location / { return 200 'hello\n'; } } }
CONF
cat > "$work/l4lb.yaml" <<CONF
workers: 2
listeners:
  - { name: http, bind: "127.0.0.1:18200", pool: http }
  - { name: iperf, bind: "127.0.0.1:18201", pool: iperf }
pools:
  - { name: http, backends: [ { address: "127.0.0.1:18281" }, { address: "127.0.0.1:18282" } ] }
  - { name: iperf, backends: [ { address: "127.0.0.1:15251" } ] }
CONF
nginx -g 'daemon off;' -c "$work/backend.conf" -p "$work" & pids+=($!)
iperf3 -s -p 15251 -B 127.0.0.1 >/dev/null 2>&1 & pids+=($!)
target/release/l4lb --config "$work/l4lb.yaml" 2>"$work/l4lb.log" & pids+=($!)
SOCKMAP_PINS="$pins-maps" python3 benches/sockmap/proxy.py 18210 18281 18282 & pids+=($!)
SOCKMAP_PINS="$pins-maps" python3 benches/sockmap/proxy.py 18211 15251 & pids+=($!)
for port in 18281 18282 15251 18200 18201 18210 18211; do
  ready=0
  # Listening, not connectable: a probe connection through the sockmap proxy would reach
  # iperf3 and never be closed (the proxy does not pass FINs), keeping iperf3 busy.
  for _ in $(seq 100); do ss -ltnH "sport = :$port" | grep -q . && { ready=1; break; }; sleep 0.1; done
  [ $ready = 1 ] || { echo "port $port never opened" >&2; exit 1; }
done

rps() { wrk -t2 -c64 -d3s "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
gbps() { timeout 20 iperf3 -c 127.0.0.1 -p "$1" -t 3 "${@:2}" -J |
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))'; }
echo "| round | keep-alive req/s auto | sockmap | tcp 1 stream Gbit/s auto | sockmap | tcp 4 streams auto | sockmap |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  echo "| $r | $(rps 18200) | $(rps 18210) | $(gbps 18201) | $(gbps 18211) | $(gbps 18201 -P 4) | $(gbps 18211 -P 4) |"
done
echo "bytes the verdict program redirected: $(bpftool map dump pinned "$pins-maps/links" -j |
  python3 -c 'import json,sys; print(sum(e["formatted"]["value"]["bytes"] for e in json.load(sys.stdin)))')"
