#!/usr/bin/env bash
# Verification: POST /v1/keys/verify with a valid key (a flows key with no
# rate limit, in an org with none: the benchmark measures verification, not
# the limiter), keep-alive, 32 connections, keyledgerd on one core, against
# nginx (one worker, on the same core) answering `return 200` with the very
# bytes keyledgerd answers, both driven by wrk on the other core with the
# same Lua script; medians of ROUNDS rounds, the servers taking turns within
# each round so that the machine's noise falls on all of them.
#  1. Throughput: keyledger (org of 10,000 keys) / nginx. Goal >= 1.0.
#  2. p99 latency: keyledger / nginx. Goal <= 1.5.
#  3. Flatness: throughput with 1,000,000 keys in the org / with 10,000.
#     Goal: within 10% (>= 0.90).
# The same three again with every request for one of SPREAD keys spread over
# the org (SPREAD=0 skips it): one key stays in the cache however big the
# org, so only the spread run shows what a big org costs.
# Each run also gives the server's CPU time per request, the figure the
# machine's noise disturbs least (a server under 100% of its core was held
# back by wrk or by someone else on the machine).
# KL_BENCH_PERF=1 then profiles keyledgerd (the big org, one key) under the
# same load with `perf record -g` (KL_BENCH_PERF_CG=dwarf for user-space call
# graphs) for PERF_SECS seconds and prints the top symbols; KL_BENCH_PERF=spread
# profiles the big org with the keys spread instead.
. "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
WARM=${WARM:-2}
CONNS=${CONNS:-32}
SMALL=${SMALL:-10000}
BIG=${BIG:-1000000}
SPREAD=${SPREAD:-10000}
PERF_SECS=${PERF_SECS:-5}
FLOW=flow_orders              # the flow genlog's keys may call

# Servers on core 0, wrk (and perf) on core 1, when there are two cores.
SRV=(); CLI=(); WRK_THREADS=2
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  SRV=(taskset -c 0); CLI=(taskset -c 1); WRK_THREADS=1
else
  echo "warning: not pinning (no taskset or one core): figures are noisier" >&2
fi

# Like lib.sh's start_keyledgerd, pinned, and waiting as long as the replay
# of a big log takes.
start_pinned() {  # start_pinned DATA PORT -> KL_PID
  local data=$1 port=$2
  "${SRV[@]}" "$KL_BUILD/keyledgerd" --data "$data" --listen "127.0.0.1:$port" --fsync off \
    2>"$BENCH_TMP/keyledgerd.$port.log" &
  KL_PID=$!
  BENCH_PIDS+=("$KL_PID")
  for _ in $(seq 1 1200); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/readyz" && return 0
    kill -0 "$KL_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "keyledgerd on $data never became ready:" >&2
  cat "$BENCH_TMP/keyledgerd.$port.log" >&2
  return 1
}

verify_body() { printf '{"key":"%s","flow":"%s"}' "$1" "$FLOW"; }

# The wrk scripts: done() prints exact figures (latency in us).
LUA_DONE='
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KLB %.1f %d %d %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end'
make_lua() {      # make_lua FILE SECRET: every request for one key
  cat > "$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$(verify_body "$2")'
$LUA_DONE
LUA
}
make_lua_spread() {  # make_lua_spread FILE SECRETS_FILE: a random key a request
  cat > "$1" <<LUA
local reqs = {}
init = function(args)
  for s in io.lines("$2") do
    reqs[#reqs + 1] = wrk.format("POST", nil, {["Content-Type"] = "application/json"},
      '{"key":"' .. s .. '","flow":"$FLOW"}')
  end
end
request = function() return reqs[math.random(#reqs)] end
$LUA_DONE
LUA
}

# The answer keyledgerd gives a secret; stops the benchmark unless VALID.
answer_of() {     # answer_of PORT SECRET
  local a
  a=$(curl -fs -X POST -H 'Content-Type: application/json' --data "$(verify_body "$2")" \
        "http://127.0.0.1:$1/v1/keys/verify")
  case $a in *'"code":"VALID"'*) ;; *) echo "verify did not answer VALID: $a" >&2; return 1;; esac
  printf '%s' "$a"
}

# CPU ticks: of a process (all threads), and the busy ones of cores 0 and 1.
cpu_ticks() {
  awk '{printf "%d ", $14 + $15}' "/proc/$1/stat"
  awk '$1 == "cpu0" || $1 == "cpu1" {printf "%d ", $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
TCK=$(getconf CLK_TCK)
pct() { python3 -c "import sys; a,b,t0,t1=map(int,sys.argv[1:]); print(round(100*(b-a)/$TCK/((t1-t0)/1e9)))" "$@"; }

# run_wrk NAME URL LUA PID SECS
#   -> "rps p50_us p99_us server_cpu% core0_busy% core1_busy%"
run_wrk() {
  local name=$1 url=$2 lua=$3 pid=$4 secs=$5 out t0 t1 rps p50 p99 errs bad
  local p0 a0 b0 p1 a1 b1
  read -r p0 a0 b0 <<<"$(cpu_ticks "$pid")"; t0=$(date +%s%N)
  out=$("${CLI[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" -s "$lua" "$url")
  read -r p1 a1 b1 <<<"$(cpu_ticks "$pid")"; t1=$(date +%s%N)
  read -r rps p50 p99 errs bad <<<"$(echo "$out" | awk '/^KLB / {print $2, $3, $4, $5, $6}')"
  [ -n "$rps" ] || { echo "wrk failed on $name: $out" >&2; return 1; }
  [ "$errs" != 0 ] && echo "warning: $name: $errs socket errors" >&2
  [ "$bad" != 0 ] && echo "warning: $name: $bad non-2xx answers" >&2
  echo "$rps $p50 $p99 $(pct "$p0" "$p1" "$t0" "$t1") $(pct "$a0" "$a1" "$t0" "$t1") $(pct "$b0" "$b1" "$t0" "$t1")"
}

# ---- the data: two orgs, each key a flows key without limits -------------
echo "generating an org of $SMALL keys and one of $BIG..."
for o in "small $SMALL" "big $BIG"; do
  read -r org n <<<"$o"
  "$KL_BUILD/kl_genlog" --no-limits --print-secret "$BENCH_TMP/$org.secrets" \
    --spread "$(( SPREAD > 0 ? SPREAD : 1 ))" "$BENCH_TMP/$org" "$n"
  tail -1 "$BENCH_TMP/$org.secrets" > "$BENCH_TMP/$org.secret"   # the last key
  make_lua "$BENCH_TMP/$org.lua" "$(cat "$BENCH_TMP/$org.secret")"
  make_lua_spread "$BENCH_TMP/$org-spread.lua" "$BENCH_TMP/$org.secrets"
done
small_secret=$(cat "$BENCH_TMP/small.secret"); big_secret=$(cat "$BENCH_TMP/big.secret")

sport=$(free_port); start_pinned "$BENCH_TMP/small" "$sport"; spid=$KL_PID
bport=$(free_port); start_pinned "$BENCH_TMP/big" "$bport"; bpid=$KL_PID
sed -n 's/.*\(replayed .*\)/  big org: \1/p' "$BENCH_TMP/keyledgerd.$bport.log"
body=$(answer_of "$sport" "$small_secret")
big_body=$(answer_of "$bport" "$big_secret")
[ "${#body}" -eq "${#big_body}" ] || echo "warning: answers differ in size (${#body} vs ${#big_body} B)" >&2
if [ "$SPREAD" -gt 0 ]; then    # every spread key answers VALID, in as many bytes
  for org in small big; do
    [ "$org" = small ] && p=$sport || p=$bport
    for s in $(sed -n '1p;$p' "$BENCH_TMP/$org.secrets"); do
      a=$(answer_of "$p" "$s")
      [ "${#a}" -eq "${#body}" ] || echo "warning: a spread key's answer is ${#a} B, not ${#body}" >&2
    done
  done
fi

# ---- nginx: one worker, the same answer, in its own prefix ---------------
case $body in *[\'\\\$]*) echo "the answer holds a character nginx's return would mangle: $body" >&2; exit 1;; esac
ngx=$BENCH_TMP/nginx; nport=$(free_port)
mkdir -p "$ngx/logs" "$ngx/tmp"
user_line=""   # as root, nginx would hand its worker to nobody: keep it ours
[ "$(id -u)" -eq 0 ] && user_line="user $(id -un) $(id -gn);"
cat > "$ngx/nginx.conf" <<NGX
$user_line
worker_processes 1;
daemon off;
pid $ngx/nginx.pid;
error_log $ngx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  default_type application/json;
  keepalive_timeout 65;
  keepalive_requests 100000000;
  client_body_temp_path $ngx/tmp/body;
  proxy_temp_path $ngx/tmp/proxy;
  fastcgi_temp_path $ngx/tmp/fastcgi;
  uwsgi_temp_path $ngx/tmp/uwsgi;
  scgi_temp_path $ngx/tmp/scgi;
  server {
    listen 127.0.0.1:$nport;
    location / { return 200 '$body'; }
  }
}
NGX
"${SRV[@]}" nginx -p "$ngx" -c "$ngx/nginx.conf" -e "$ngx/logs/error.log" &
npid=$!; BENCH_PIDS+=("$npid")
wait_http "http://127.0.0.1:$nport/"
nbody=$(curl -fs -X POST -H 'Content-Type: application/json' --data "$(verify_body "$small_secret")" \
          "http://127.0.0.1:$nport/v1/keys/verify")
[ "$nbody" = "$body" ] || { echo "nginx answers something else: $nbody" >&2; exit 1; }
nworker=$(pgrep -P "$npid" | head -1)
[ -n "$nworker" ] || { echo "no nginx worker" >&2; exit 1; }
hdr() { curl -s -o /dev/null -w '%{size_header}' -X POST -H 'Content-Type: application/json' \
          --data "$(verify_body "$small_secret")" "http://127.0.0.1:$1/v1/keys/verify"; }
echo "answer: ${#body} B of JSON; headers: keyledgerd $(hdr "$sport") B, nginx $(hdr "$nport") B"

# ---- the rounds --------------------------------------------------------
# A target: "id label port lua pid". nginx gets the small org's Lua: the
# same requests, its answer ignores them.
TARGETS=("ngx nginx $nport small $nworker"
         "sm kl-$SMALL $sport small $spid"
         "bg kl-$BIG $bport big $bpid")
[ "$SPREAD" -gt 0 ] && TARGETS+=("ngxS nginx-spread $nport small-spread $nworker"
                                 "smS kl-$SMALL-spread $sport small-spread $spid"
                                 "bgS kl-$BIG-spread $bport big-spread $bpid")
url() { echo "http://127.0.0.1:$1/v1/keys/verify"; }
for t in "${TARGETS[@]}"; do
  read -r _ name p l pid <<<"$t"
  run_wrk "$name" "$(url "$p")" "$BENCH_TMP/$l.lua" "$pid" "$WARM" >/dev/null
done
declare -A RPS P50 P99 CPR
echo "(server cpu: of its one core; busy: each core, by anyone; us/req: server CPU per request)"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    read -r k name p l pid <<<"$t"
    read -r rps p50 p99 cpu c0 c1 <<<"$(run_wrk "$name" "$(url "$p")" "$BENCH_TMP/$l.lua" "$pid" "$SECS")"
    cpr=$(python3 -c "print(f'{$cpu*1e4/$rps:.2f}')")
    RPS[$k]+="$rps "; P50[$k]+="$p50 "; P99[$k]+="$p99 "; CPR[$k]+="$cpr "
    printf 'round %d: %-19s %6.0f req/s  p50 %5d us  p99 %6d us  cpu %3d%% (%5.2f us/req)  busy: core0 %3d%%, core1 %3d%%\n' \
      "$r" "$name" "$rps" "$p50" "$p99" "$cpu" "$cpr" "$c0" "$c1"
  done
done
# Still VALID at the end: no limiter, no throttle got in the way.
answer_of "$sport" "$small_secret" >/dev/null
answer_of "$bport" "$big_secret" >/dev/null

# shellcheck disable=SC2086  # word-split on purpose: one figure per round
summary() {     # summary TITLE NGX SMALL BIG
  local n=$2 s=$3 b=$4 nr sr br
  nr=$(median ${RPS[$n]}); sr=$(median ${RPS[$s]}); br=$(median ${RPS[$b]})
  echo "$1, $CONNS connections, one server core, medians of $ROUNDS x ${SECS}s:"
  for x in "$n nginx (constant answer)" "$s keyledger, $SMALL keys" "$b keyledger, $BIG keys"; do
    read -r k label <<<"$x"
    printf '  %-26s %7.0f req/s  p50 %5.0f us  p99 %6.0f us  cpu %5.2f us/req\n' "$label" \
      "$(median ${RPS[$k]})" "$(median ${P50[$k]})" "$(median ${P99[$k]})" "$(median ${CPR[$k]})"
  done
  echo "  throughput keyledger/nginx: $(ratio "$sr" "$nr") (goal >= 1.0); with $BIG keys $(ratio "$br" "$nr")"
  echo "  p99 latency keyledger/nginx: $(ratio "$(median ${P99[$s]})" "$(median ${P99[$n]})") (goal <= 1.5); with $BIG keys $(ratio "$(median ${P99[$b]})" "$(median ${P99[$n]})")"
  echo "  flatness, throughput with $BIG keys / with $SMALL: $(ratio "$br" "$sr") (goal >= 0.90)"
  echo "  server CPU per request keyledger/nginx: $(ratio "$(median ${CPR[$s]})" "$(median ${CPR[$n]})"); $BIG keys / $SMALL: $(ratio "$(median ${CPR[$b]})" "$(median ${CPR[$s]})")"
}
summary "verify, one key" ngx sm bg
[ "$SPREAD" -gt 0 ] && summary "verify, $SPREAD keys spread over the org" ngxS smS bgS

# ---- optional: where keyledgerd's time goes --------------------------------
if [ "${KL_BENCH_PERF:-0}" != 0 ]; then
  perf_lua=$BENCH_TMP/big.lua; perf_what="one key"
  [ "$KL_BENCH_PERF" = spread ] && perf_lua=$BENCH_TMP/big-spread.lua && perf_what="$SPREAD keys spread"
  if ! command -v perf >/dev/null; then
    echo "KL_BENCH_PERF=1 but perf is not installed: no profile" >&2
  else
    cg=(-g); [ -n "${KL_BENCH_PERF_CG:-}" ] && cg=(--call-graph "$KL_BENCH_PERF_CG")
    echo "profiling keyledgerd ($BIG keys, $perf_what) for ${PERF_SECS}s under the same load..."
    run_wrk perf "$(url "$bport")" "$perf_lua" "$bpid" $((PERF_SECS + 3)) >/dev/null &
    wrk_job=$!
    sleep 1
    "${CLI[@]}" perf record -q "${cg[@]}" -o "$BENCH_TMP/perf.data" -p "$bpid" -- sleep "$PERF_SECS" \
      >/dev/null 2>"$BENCH_TMP/perf.err" || cat "$BENCH_TMP/perf.err" >&2
    wait "$wrk_job" || true
    if [ -s "$BENCH_TMP/perf.data" ]; then
      rep() { perf report -i "$BENCH_TMP/perf.data" --stdio --no-children "$@" 2>/dev/null; }
      echo "time by object:"
      rep -g none --sort dso | grep -v '^#' | grep -v '^$' | head -10
      echo "top symbols (self time):"
      rep -g none --percent-limit 0.3 | grep -v '^#' | grep -v '^$' | head -30
      echo "call graphs (perf report --stdio --no-children | head -60):"
      rep | head -60
    fi
  fi
fi
