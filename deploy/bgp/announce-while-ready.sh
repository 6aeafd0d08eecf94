#!/bin/sh
# Announces the VIP while l4lb is ready: polls /ready (no token needed) ten times a second
# and enables BIRD's static protocol "vip" while it answers 200, disables it after two
# failed polls in a row (SIGTERM turns /ready to 503 at once). The wanted state is sent
# again every two seconds, so a restarted BIRD (whose "vip" starts disabled) catches up.
# Usage: announce-while-ready.sh ADMIN_URL BIRD_SOCKET
# e.g.   announce-while-ready.sh http://127.0.0.1:9900 /run/bird/bird.ctl
admin=${1:-http://127.0.0.1:9900}
socket=${2:-/run/bird/bird.ctl}
state=unknown
failed=0
tick=0
while true; do
  if curl -sf -o /dev/null --max-time 1 "$admin/ready"; then
    failed=0; want=enable
  else
    failed=$((failed + 1))
    if [ "$failed" -ge 2 ]; then want=disable; else want=$state; fi
  fi
  tick=$((tick + 1))
  if [ "$want" != unknown ] && { [ "$want" != "$state" ] || [ "$tick" -ge 20 ]; }; then
    birdc -s "$socket" "$want" vip >/dev/null && state=$want
    tick=0
  fi
  sleep 0.1
done
