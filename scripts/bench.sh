#!/usr/bin/env bash
# The side-by-side benchmark: l4lb vs HAProxy (mode tcp, splice-auto) vs nginx stream vs
# the backend directly, on loopback, interleaved rounds, one table of medians and ratios.
# Installs iperf3, wrk, haproxy and nginx (with its stream module) if missing, builds l4lb
# in release mode, and stops everything it started. About 4 minutes on 2 cores.
# Knobs: BENCH_ROUNDS (3), BENCH_SECONDS (2), BENCH_WORKERS (2), BENCH_IDLE_CONNS (7500: HAProxy sizes its descriptors for maxconn plus splice pipes, and the hard limit here is 20000),
# BENCH_ONLY=udp,idle,syscalls,instructions,... (substring of scenario names), BENCH_BASELINE=path/to/another/l4lb (runs it beside
# this build in the same rounds and adds an l4lb/base table: how a change is judged on a noisy machine).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wrk >/dev/null || need+=(wrk)
command -v strace >/dev/null || need+=(strace)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v python3 >/dev/null || need+=(python3)
# callgrind counts the instructions l4lb itself runs per connection (BENCH_ONLY=instructions).
command -v callgrind_control >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# Debian starts the packaged daemons on install; the benchmark runs its own.
systemctl stop nginx haproxy 2>/dev/null || true

# 10k idle connections need 20k descriptors per proxy (and as many here); root may raise
# the hard limit, others get what they have.
ulimit -n 300000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -p l4lb
# benches/bare-proxy/run.sh sets up through here and runs its own comparison.
[ "${1:-}" = --setup-only ] && exit 0
exec python3 benches/compare.py
