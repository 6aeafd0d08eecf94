#!/usr/bin/env bash
# The io_uring experiment of issue 15, reproducible: a minimal TCP proxy (src/), driven by
# io_uring and by epoll, beside l4lb, HAProxy and nginx stream on new connections per second,
# keep-alive requests, CPU, syscalls and segments per connection (run.py). Installs what
# scripts/bench.sh installs; knobs as there (BENCH_ROUNDS, BENCH_SECONDS, BENCH_WORKERS).
# `run.sh udp`: the UDP experiment (a bare UDP forwarder beside l4lb and nginx) instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/bench.sh --setup-only
ulimit -n 300000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --manifest-path benches/bare-proxy/Cargo.toml
exec python3 benches/bare-proxy/run.py "$@"
