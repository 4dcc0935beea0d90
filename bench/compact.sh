#!/usr/bin/env bash
# Compaction: `keyledger compact --usage-retention-days RETENTION` (7) of a
# log of about 1,000,000 events, in events per second (events in the old
# log / wall seconds of the whole command: open, both passes, the new log,
# its snapshot, the fsyncs and the switch), against Redis BGREWRITEAOF of an
# AOF of as many commands shaped like the events (commands per second, from
# the command until INFO persistence says aof_rewrite_in_progress:0 and
# aof_last_bgrewrite_status:ok). No goal yet: the figures and the ratio.
#
# The log (bench/genlog.c): one org, its owner, KEYS keys (100,000), then
# USAGE UsageRecorded events (900,000) spread evenly over the DAYS days (30)
# before now, in groups of 256 like the daemon's flush, round robin over
# USAGE_KEYS of the keys (1,000, spread over the org): 30 events a key and
# day, so the compaction folds the usage older than RETENTION days into one
# daily total per key and day and keeps the rest. (With every key used,
# USAGE_KEYS=KEYS, a key has one event every 3.3 days and nothing folds
# together: the log does not shrink.)
# The AOF: the same org and owner and each key as an HSET of 6 fields (as in
# startup.sh), then one HINCRBY usage:<key>:<day> a usage event, on the same
# key and UTC day as the event: the rewrite folds them into one hash per key
# and day (all of them: Redis has no retention). Redis 7 defaults
# (aof-use-rdb-preamble yes: the rewritten base is RDB), no automatic
# rewrite, hz 100 so that the end of the rewrite is noticed within 10 ms.
#
# Each of ROUNDS (3) rounds works on fresh copies: keyledger compacts one
# and the daemon then starts on it (the snapshot, nothing after it),
# against a start on another copy of the old log (full replay); times are
# the daemon's own ("... in X ms; ready") and exec until /readyz answers.
# Medians of the rounds. KL_BENCH_PERF=1 then profiles one more compaction
# with `perf record -g` (KL_BENCH_PERF_CG=dwarf for user-space call graphs)
# and prints the top symbols.
. "$(dirname "$0")/lib.sh"
KEYS=${KEYS:-100000}
USAGE=${USAGE:-900000}
USAGE_KEYS=${USAGE_KEYS:-1000}
DAYS=${DAYS:-30}
RETENTION=${RETENTION:-7}
ROUNDS=${ROUNDS:-3}
N=$((KEYS + USAGE + 2))         # events: the org, its owner, keys, usage

# keyledgerd on DATA until /readyz, waiting as long as a big replay takes
# -> "ready_ms exec_to_readyz_ms seq"; stops it again.
kl_start() {      # kl_start DATA
  local port t0 t1 pid ms ready=""
  port=$(free_port)
  t0=$(date +%s%N)
  "$KL_BUILD/keyledgerd" --data "$1" --listen "127.0.0.1:$port" --fsync off \
    2>"$BENCH_TMP/keyledgerd.$port.log" &
  pid=$!; BENCH_PIDS+=("$pid")
  for _ in $(seq 1 12000); do
    ready=$(curl -fs "http://127.0.0.1:$port/readyz" 2>/dev/null) && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  t1=$(date +%s%N)
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  ms=$(sed -n 's/.* in \([0-9.]*\) ms; ready.*/\1/p' "$BENCH_TMP/keyledgerd.$port.log")
  if [ -z "$ready" ] || [ -z "$ms" ]; then
    echo "keyledgerd on $1 never became ready:" >&2
    cat "$BENCH_TMP/keyledgerd.$port.log" >&2
    return 1
  fi
  ready=$(sed -n 's/.*"seq":\([0-9]*\).*/\1/p' <<<"$ready")
  # The line says what it started from: "replayed N events" or "loaded the
  # snapshot of seq S and replayed M events after it".
  sed -n 's/.*info keyledgerd: \(.*\); ready.*/(\1)/p' "$BENCH_TMP/keyledgerd.$port.log" \
    > "$BENCH_TMP/start.last"
  echo "$ms $(( (t1 - t0) / 1000000 )) $ready"
}

# The AOF: SELECT, then N commands, the keys and the usage in the log's
# order, usage on the same key and UTC day as genlog's events.
make_aof() {      # make_aof FILE
  python3 - "$1" "$KEYS" "$USAGE" "$USAGE_KEYS" "$DAYS" <<'PY'
import sys, time
path, n, k, m, days = sys.argv[1], *map(int, sys.argv[2:])
m = min(max(m, 1), n) if n else 1
DAY = 86400000
span = days * DAY
start = int(time.time() * 1000) - span
def cmd(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
with open(path, "wb") as f:
    w = f.write
    w(cmd("SELECT", "0"))
    w(cmd("HSET", "org_01m840qzxe405pt2gg7smef00s", "name", "Bench",
          "created_at", "2026-10-24T11:01:13.811Z"))
    w(cmd("HSET", "usr_01m840qzxe405pt2gg7smef00t", "email", "owner@bench.test",
          "role", "owner", "org", "org_01m840qzxe405pt2gg7smef00s"))
    for i in range(n):
        w(cmd("HSET", "key_01m8%022d" % i, "name", "service key %d" % i,
              "owner", "usr_01m840qzxe405pt2gg7smef00t",
              "prefix", "kl_live_01m8%04d" % (i % 10000),
              "hash", "%064x" % (i * 2654435761),
              "created_at", "2026-10-24T11:01:13.811Z",
              "status", "active"))
    step = n // m if m else 1
    for j in range(k):
        to = start + span * (j + 1) // k
        day = (to - 1000) // DAY
        w(cmd("HINCRBY", "usage:key_01m8%022d:%d" % (j % m * step, day),
              "flow_orders", str(1 + j % 7)))
PY
}

# Redis on a fresh copy of the AOF: load it, then BGREWRITEAOF, timed from
# the command until INFO persistence says it is done and ok.
# -> "rewrite_s aof_bytes_before base_bytes_after keys_in_redis load_s" (the
# load as Redis logs it).
redis_rewrite() {  # redis_rewrite DIR
  local dir=$1 port pid out load
  rm -rf "$dir"; mkdir -p "$dir"
  cp "$BENCH_TMP/big.aof" "$dir/appendonly.aof"
  port=$(free_port)
  redis-server --port "$port" --dir "$dir" --appendonly yes --appendfilename appendonly.aof \
    --auto-aof-rewrite-percentage 0 --hz 100 --save '' --daemonize no >"$dir.log" 2>&1 &
  pid=$!; BENCH_PIDS+=("$pid")
  out=$(python3 - "$port" "$(stat -c %s "$dir/appendonly.aof")" <<'PY'
import socket, sys, time
port, before = int(sys.argv[1]), int(sys.argv[2])
for _ in range(30000):
    try:
        s = socket.create_connection(("127.0.0.1", port)); break
    except OSError:
        time.sleep(0.01)
else:
    sys.exit("redis never answered")
f = s.makefile("rb")
def call(*args):
    s.sendall(b"".join([b"*%d\r\n" % len(args)] +
                       [b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args]))
    line = f.readline()
    if line[:1] == b"$":
        n = int(line[1:])
        data = f.read(n + 2)[:-2]
        return data.decode()
    return line.decode().strip()
def info():
    return dict(l.split(":", 1) for l in call("INFO", "persistence").splitlines()
                if ":" in l)
while True:     # -LOADING while the AOF loads
    r = call("PING")
    if r == "+PONG" and info()["loading"] == "0":
        break
    time.sleep(0.01)
keys = int(call("DBSIZE")[1:])
i0 = info()
assert i0["aof_rewrite_in_progress"] == "0" and i0["aof_rewrite_scheduled"] == "0", i0
t0 = time.perf_counter()
r = call("BGREWRITEAOF")
if not r.startswith("+"):
    sys.exit("BGREWRITEAOF: " + r)
while True:
    i = info()
    if (i["aof_rewrite_in_progress"] == "0" and i["aof_rewrite_scheduled"] == "0"
            and i["aof_rewrites"] != i0["aof_rewrites"]):
        break
    time.sleep(0.002)
t1 = time.perf_counter()
if i["aof_last_bgrewrite_status"] != "ok":
    sys.exit("rewrite failed: " + str(i))
print(f"{t1 - t0:.4f} {before} {i['aof_base_size']} {keys}")
PY
  ) || { echo "redis rewrite failed:" >&2; tail -20 "$dir.log" >&2; return 1; }
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid"
  wait "$pid" 2>/dev/null || true
  load=$(sed -n 's/.*DB loaded from append only file: \([0-9.]*\) seconds.*/\1/p' "$dir.log" | tail -1)
  echo "$out ${load:-0}"
}

# Arithmetic in the rounds with awk: python3 can take a second to start.
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
r2() { awk -v a="$1" -v b="$2" 'BEGIN { if (b) printf "%.2f", a / b; else printf "n/a" }'; }
json_get() {      # json_get JSON FIELD...: the numbers, in that order (flat JSON)
  local j=$1 f; shift
  for f in "$@"; do sed -n "s/.*\"$f\":\([0-9.]*\).*/\1/p" <<<"$j"; done | paste -sd' '
}
dir_bytes() { du -sb "$1" | cut -f1; }   # every file: segments, snapshot, MANIFEST

echo "generating $N events ($KEYS keys, $USAGE usage events of $USAGE_KEYS keys over $DAYS days) and an AOF of $N commands..."
"$KL_BUILD/kl_genlog" --usage "$USAGE" --usage-days "$DAYS" --usage-keys "$USAGE_KEYS" \
  "$BENCH_TMP/big" "$KEYS"
make_aof "$BENCH_TMP/big.aof"
"$KL_BUILD/keyledger" verify --data "$BENCH_TMP/big" >/dev/null \
  || { echo "the generated log does not verify" >&2; exit 1; }

klr=(); rdr=(); rdl=(); kls=(); rds=(); kl_after=(); kl_full=(); kl_after_t=(); kl_full_t=()
for r in $(seq 1 "$ROUNDS"); do
  # Fresh copies: one to compact, one for the full-replay start (the daemon
  # may write, e.g. alerts, so it never starts on the original).
  rm -rf "$BENCH_TMP/work" "$BENCH_TMP/start"
  cp -a "$BENCH_TMP/big" "$BENCH_TMP/work"
  cp -a "$BENCH_TMP/big" "$BENCH_TMP/start"
  t0=$(date +%s%N)
  out=$("$KL_BUILD/keyledger" compact --data "$BENCH_TMP/work" --usage-retention-days "$RETENTION" \
          2>"$BENCH_TMP/compact.err") \
    || { echo "keyledger compact failed:" >&2; cat "$BENCH_TMP/compact.err" >&2; exit 1; }
  t1=$(date +%s%N)
  secs=$(calc "($t1 - $t0) / 1e9")
  read -r ev_before ev_after folded totals b_before b_after head <<<"$(json_get "$out" \
    events_before events_after usage_events_folded daily_totals bytes_before bytes_after head_seq)"
  [ "$r" = 1 ] && { "$KL_BUILD/keyledger" verify --data "$BENCH_TMP/work" >/dev/null \
    || { echo "the compacted log does not verify" >&2; exit 1; }; }
  d_after=$(dir_bytes "$BENCH_TMP/work")
  out=$(kl_start "$BENCH_TMP/work") || exit 1
  read -r a_ms a_total a_seq <<<"$out"
  a_line=$(cat "$BENCH_TMP/start.last")
  [ "$a_seq" = "$head" ] || echo "warning: the daemon started at seq $a_seq, not $head" >&2
  out=$(kl_start "$BENCH_TMP/start") || exit 1
  read -r f_ms f_total _ <<<"$out"
  f_line=$(cat "$BENCH_TMP/start.last")
  out=$(redis_rewrite "$BENCH_TMP/redis") || exit 1
  read -r rsecs r_before r_after r_keys r_load <<<"$out"

  klr+=("$(calc "$ev_before / $secs")"); kls+=("$secs")
  rdr+=("$(calc "$N / $rsecs")"); rds+=("$rsecs")
  rdl+=("$(calc "$N / ($r_load + $rsecs)")")
  kl_after+=("$a_ms"); kl_full+=("$f_ms"); kl_after_t+=("$a_total"); kl_full_t+=("$f_total")
  printf 'round %d: keyledger compact %.2f s (%.0f events/s; %d -> %d events, %d usage folded into %d daily totals), segments %s -> %s (%s)\n' \
    "$r" "$secs" "${klr[-1]}" "$ev_before" "$ev_after" "$folded" "$totals" \
    "$(mb "$b_before")" "$(mb "$b_after")" "$(r2 "$b_after" "$b_before")"
  printf '         start after %.0f ms (to /readyz %d ms) %s, before %.0f ms (to /readyz %d ms) %s\n' \
    "$a_ms" "$a_total" "$a_line" "$f_ms" "$f_total" "$f_line"
  printf '         redis BGREWRITEAOF %.3f s (%.0f commands/s), AOF %s -> %s (%s; loaded in %s s)\n' \
    "$rsecs" "${rdr[-1]}" "$(mb "$r_before")" "$(mb "$r_after")" "$(r2 "$r_after" "$r_before")" "$r_load"
done
k=$(median "${klr[@]}"); rd=$(median "${rdr[@]}")
am=$(median "${kl_after[@]}"); fm=$(median "${kl_full[@]}")
at=$(median "${kl_after_t[@]}"); ft=$(median "${kl_full_t[@]}")
d_before=$(dir_bytes "$BENCH_TMP/big")
echo "compaction of $N events ($USAGE usage events of $USAGE_KEYS keys over $DAYS days, retention $RETENTION days), medians of $ROUNDS rounds:"
printf '  keyledger compact      %9.0f events/s   (%.2f s)\n' "$k" "$(median "${kls[@]}")"
printf '  redis BGREWRITEAOF     %9.0f commands/s (%.3f s)\n' "$rd" "$(median "${rds[@]}")"
echo "  throughput keyledger/redis: $(ratio "$k" "$rd") (no goal yet)"
rl=$(median "${rdl[@]}")
printf '  (a rewrite forks and writes the dataset, %s hashes here, without reading the commands again; redis\n' \
  "$r_keys"
printf '  loading the AOF and rewriting it: %.0f commands/s, keyledger/that %s)\n' "$rl" "$(ratio "$k" "$rl")"
echo "  log: segments $(mb "$b_before") -> $(mb "$b_after") ($(ratio "$b_after" "$b_before")); data dir with the snapshot $(mb "$d_before") -> $(mb "$d_after") ($(ratio "$d_after" "$d_before")); redis AOF $(mb "$r_before") -> $(mb "$r_after") ($(ratio "$r_after" "$r_before"))"
printf '  start after compaction %.0f ms (to /readyz %.0f ms), before (full replay) %.0f ms (to /readyz %.0f ms): %sx faster\n' \
  "$am" "$at" "$fm" "$ft" "$(ratio "$fm" "$am")"
printf 'compaction: keyledger %.0f events/s, redis BGREWRITEAOF %.0f commands/s, ratio %s; log %sx smaller; start %sx faster\n' \
  "$k" "$rd" "$(ratio "$k" "$rd")" "$(ratio "$b_before" "$b_after")" "$(ratio "$fm" "$am")"

# ---- optional: where the compaction's time goes ---------------------------
if [ "${KL_BENCH_PERF:-0}" = 1 ]; then
  if ! command -v perf >/dev/null; then
    echo "KL_BENCH_PERF=1 but perf is not installed: no profile" >&2
  else
    cg=(-g); [ -n "${KL_BENCH_PERF_CG:-}" ] && cg=(--call-graph "$KL_BENCH_PERF_CG")
    echo "profiling one more compaction..."
    rm -rf "$BENCH_TMP/work"; cp -a "$BENCH_TMP/big" "$BENCH_TMP/work"
    perf record -q "${cg[@]}" -o "$BENCH_TMP/perf.data" -- "$KL_BUILD/keyledger" compact \
      --data "$BENCH_TMP/work" --usage-retention-days "$RETENTION" >/dev/null 2>"$BENCH_TMP/perf.err" \
      || cat "$BENCH_TMP/perf.err" >&2
    if [ -s "$BENCH_TMP/perf.data" ]; then
      rep() { perf report -i "$BENCH_TMP/perf.data" --stdio --no-children "$@" 2>/dev/null; }
      echo "time by object:"
      rep -g none --sort dso | grep -v '^#' | grep -v '^$' | head -10
      echo "top symbols (self time):"
      rep -g none --percent-limit 0.5 | grep -v '^#' | grep -v '^$' | head -30
      echo "call graphs (perf report --stdio --no-children | head -80):"
      rep | head -80
    fi
  fi
fi
