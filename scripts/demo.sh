#!/usr/bin/env bash
# Starts three demo backends on 127.0.0.1:9001-9003 (each answers HTTP with its own name),
# runs l4lb on config/l4lb.yaml in front of them, shows six requests alternating over the
# backends, then keeps running until Ctrl-C. Everything it started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3; }
cargo build --release -p l4lb

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

for i in 1 2 3; do
  python3 - "$((9000 + i))" "backend-$i" <<'PY' &
import http.server, sys
port, name = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
  pids+=($!)
done

./target/release/l4lb --config config/l4lb.yaml &
pids+=($!)

python3 - <<'PY'
import socket, time, urllib.request
deadline = time.time() + 30
for port in (9001, 9002, 9003, 8080):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
        except OSError:
            if time.time() > deadline: raise SystemExit(f"port {port} did not come up")
            time.sleep(0.1)
print("\nsix requests to l4lb on 127.0.0.1:8080:")
for _ in range(6):
    print("  ", urllib.request.urlopen("http://127.0.0.1:8080/").read().decode().strip())
print("\nl4lb keeps running: try  curl http://127.0.0.1:8080/")
print("  ./target/release/l4lb ctl status                      # pools and backends (admin 127.0.0.1:9900)")
print("  ./target/release/l4lb ctl drain web 127.0.0.1:9002     # no new connections to 9002")
print("  curl http://127.0.0.1:9900/metrics                     # Prometheus metrics")
print("  kill -HUP <pid>  or  ./target/release/l4lb ctl reload  # reload config/l4lb.yaml")
print("(Ctrl-C stops everything)\n")
PY
wait
