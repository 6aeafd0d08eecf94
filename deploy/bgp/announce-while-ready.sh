#!/bin/sh
# Announces the VIP while l4lb is ready: polls /ready and enables or disables BIRD's
# static protocol "vip" on each change. Usage: announce-while-ready.sh ADMIN_URL BIRD_SOCKET
# e.g. announce-while-ready.sh http://127.0.0.1:9900 /run/bird/bird.ctl
admin=${1:-http://127.0.0.1:9900}
socket=${2:-/run/bird/bird.ctl}
state=unknown
while true; do
  if curl -sf -o /dev/null --max-time 1 "$admin/ready"; then want=enable; else want=disable; fi
  if [ "$want" != "$state" ]; then
    birdc -s "$socket" "$want" vip >/dev/null && state=$want
  fi
  sleep 0.1
done
