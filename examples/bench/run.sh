#!/usr/bin/env bash
# Benchmark: the 公众号 webhook under wrk, against stand-in LLM and WeChat servers on 127.0.0.1,
# next to a bare actix-web handler that only answers "success", in the same run.
#
#   bash examples/bench/run.sh            # needs wrk, curl and bc (apt-get install wrk curl bc)
#   DURATION=20s CONNECTIONS=64 ROUNDS=5 STORES="memory sqlite" bash examples/bench/run.sh
#
# SAFE_MODE=0 skips the 安全模式 (encrypted) row; SAFE_REQUESTS (default 600000) is how many
# encrypted bodies are prepared for it.
#
# (a) webhook path alone: acks/s and p99 while the stand-in LLM is slow (answers wait, so they
#     do not compete for the CPU), in ROUNDS rounds that each measure every store once, back to
#     back, so that each store is compared with the memory store of its own round (a shared
#     machine drifts by more than the differences measured); the summary gives medians.
# (b) end to end: answers delivered per second with an instant stand-in LLM, after
#     E2E_DURATION (default 5s) of load.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
STORES=${STORES:-memory sqlite sqlite:process_crash}
LLM_PORT=18081 WECHAT_PORT=18082 BARE_PORT=18083 APP_PORT=18080
TOKEN=benchtoken TS=1700000000 NONCE=1
SIG=$(printf '%s' $(printf '%s\n' "$TOKEN" "$TS" "$NONCE" | sort | tr -d '\n') | sha1sum | cut -d' ' -f1)
QUERY="signature=$SIG&timestamp=$TS&nonce=$NONCE"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]:-}"; do kill -9 "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin yizhan --example bench_standins --example bench_safe_bodies
BIN=target/release

wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

start_standins() { # $1 = LLM delay in ms
  "$BIN/examples/bench_standins" $LLM_PORT $WECHAT_PORT $BARE_PORT "$1" 2>"$WORK/standins.log" &
  STANDINS=$!; PIDS+=($STANDINS); wait_port $LLM_PORT; wait_port $WECHAT_PORT; wait_port $BARE_PORT
}

start_yizhan() { # $1 = store kind, optionally ":durability"
  local kind=${1%%:*} durability=power_loss
  [[ $1 == *:* ]] && durability=${1#*:}
  cat >"$WORK/bench.toml" <<TOML
[server]
bind = "127.0.0.1:$APP_PORT"
[store]
kind = "$kind"
durability = "$durability"
path = "$WORK/db/yizhan.db"
[llm]
base_url = "http://127.0.0.1:$LLM_PORT/v1"
model = "bench"
max_concurrency = 64
max_waiting = 100000000
total_timeout_secs = 3600
first_token_timeout_secs = 3600
[session]
max_pending = 100000000
idle_timeout_secs = 3600
[[channels]]
id = "mp"
kind = "wechat_mp"
app_id = "wxbench"
app_secret = "bench-secret"
token = "$TOKEN"
api_base = "http://127.0.0.1:$WECHAT_PORT"
replay_window_secs = 0
reply_mode = "push"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
# The plaintext rows post 明文模式 pushes to the same account as the 安全模式 row.
accept_plaintext = true
TOML
  rm -rf "$WORK/db"
  RUST_LOG=warn "$BIN/yizhan" --config "$WORK/bench.toml" >"$WORK/yizhan-$kind.log" 2>&1 &
  YIZHAN=$!; PIDS+=($YIZHAN); wait_port $APP_PORT
}

load() { # $1 = port; prints the RESULT line
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}" -s examples/bench/wechat.lua "http://127.0.0.1:$1/webhooks/mp?$QUERY" | grep RESULT
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
rps_of() { sed -n 's/.*requests_per_sec=\([0-9]*\).*/\1/p'; }

echo "== (a) webhook path, slow stand-in LLM, $CONNECTIONS connections, $DURATION, $ROUNDS rounds"
start_standins 3600000
declare -A RPS
for round in $(seq 1 "$ROUNDS"); do
  echo "-- round $round"
  result=$(load $BARE_PORT); RPS[bare,$round]=$(rps_of <<<"$result")
  echo "bare actix-web handler: $result"
  for store in $STORES; do
    start_yizhan "$store"
    result=$(load $APP_PORT); RPS[$store,$round]=$(rps_of <<<"$result")
    echo "yizhan ($store store):   $result"
    kill -9 "$YIZHAN"; wait "$YIZHAN" 2>/dev/null || true
  done
done
echo "-- medians over $ROUNDS rounds (each ratio is taken within its round)"
for store in bare $STORES; do
  line="$store: $(for r in $(seq 1 "$ROUNDS"); do echo "${RPS[$store,$r]}"; done | median) acks/s"
  if [[ $store != bare && $store != memory && " $STORES " == *" memory "* ]]; then
    ratios=$(for r in $(seq 1 "$ROUNDS"); do echo "${RPS[$store,$r]} ${RPS[memory,$r]}" | awk '{ printf "%.0f\n", 100 * $1 / $2 }'; done)
    line="$line, $(median <<<"$ratios")% of the memory store (rounds: $(tr '\n' ' ' <<<"$ratios" | sed 's/ $//'))"
  fi
  echo "$line"
done
if [[ ${SAFE_MODE:-1} == 1 ]]; then
  "$BIN/examples/bench_safe_bodies" "${SAFE_REQUESTS:-600000}" "$WORK/safe.txt"
  start_yizhan memory
  echo "yizhan (memory store, 安全模式): $(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" -s examples/bench/safe.lua \
    "http://127.0.0.1:$APP_PORT" -- "$WORK/safe.txt" "http://127.0.0.1:$APP_PORT/webhooks/mp" | grep RESULT)"
  kill -9 "$YIZHAN"; wait "$YIZHAN" 2>/dev/null || true
fi
kill "$STANDINS"; wait "$STANDINS" 2>/dev/null || true

echo "== (b) end to end, instant stand-in LLM, ${E2E_DURATION:-5s} of load then until every answer is out"
start_standins 0
for store in $STORES; do
  start_yizhan "$store"
  before=$(curl -s "http://127.0.0.1:$WECHAT_PORT/stats")
  start=$(date +%s.%N)
  result=$(DURATION=${E2E_DURATION:-5s} load $APP_PORT)
  # Wait for every accepted message to be answered.
  for _ in $(seq 1 1800); do
    curl -s "http://127.0.0.1:$APP_PORT/metrics" | grep -qx 'yizhan_journal_open 0' && break; sleep 0.1
  done
  end=$(date +%s.%N)
  after=$(curl -s "http://127.0.0.1:$WECHAT_PORT/stats")
  echo "yizhan ($store store): acks: $result"
  echo "yizhan ($store store): answers delivered: $((after - before)) in $(printf '%.1f' "$(echo "$end - $start" | bc)") s = $(echo "($after - $before) / ($end - $start)" | bc) answers/s"
  kill -9 "$YIZHAN"; wait "$YIZHAN" 2>/dev/null || true
done
