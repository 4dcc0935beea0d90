#!/usr/bin/env bash
# Startup replay and memory.
#  1. Replay: keyledgerd starting on a log of N events (default 1,000,000
#     KeyCreated) against Redis loading an AOF of N HSET commands of 6 fields;
#     rates in events (commands) per second. Goal: keyledger >= 2x Redis.
#  2. Memory: resident memory per 100,000 keys, keyledgerd (RSS with the keys
#     minus RSS with none) against Redis holding 100,000 hashes of 6 fields
#     (RSS after loading minus an empty server's), medians of ROUNDS starts.
#     Goal: <= 1.0x Redis.
#  3. Snapshot: keyledgerd starting from a snapshot of the same N-event log
#     plus a short tail (TAIL UsageRecorded events: one verification of each
#     of TAIL keys spread over the org, flushed at the stop) against a full
#     replay of that log, as the daemon times the state's rebuild. Goal:
#     >= 10x faster. Also from exec to ready: both starts first open the
#     log, which checks every record of every segment. Each start follows
#     a touch of WARM_MB of memory (see host_warm below).
# PARTS (default "replay memory snapshot") picks the parts to run.
. "$(dirname "$0")/lib.sh"
N=${N:-1000000}
MEM_N=${MEM_N:-100000}
TAIL=${TAIL:-1000}
ROUNDS=${ROUNDS:-3}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Every start is measured with its files in the page cache: this VM's
# kernel reclaims idle cache quickly, and a start that reads its log from
# the disk measures the disk.
warm() { cat "$1"/* >/dev/null 2>&1 || true; }

# keyledgerd: time from exec to "ready" as it logs it (replay only), and the
# whole start (open + recovery scan + replay) until /readyz answers 200.
kl_start() {    # kl_start DATA -> "replay_ms total_ms rss_kb"
  local port t0 t1 ms rss
  port=$(free_port)
  warm "$1"
  t0=$(date +%s%N)
  start_keyledgerd "$1" "$port"
  t1=$(date +%s%N)
  ms=$(sed -n 's/.*replayed [0-9]* events in \([0-9.]*\) ms.*/\1/p' "$BENCH_TMP/keyledgerd.$port.log")
  rss=$(rss_kb "$KL_PID")
  kill "$KL_PID"; wait "$KL_PID" 2>/dev/null || true
  echo "$ms $(( (t1 - t0) / 1000000 )) $rss"
}

# An AOF of N HSETs, 6 fields each, the same shape as a key.
make_aof() {    # make_aof FILE N
  python3 - "$1" "$2" <<'PY'
import sys
path, n = sys.argv[1], int(sys.argv[2])
def cmd(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
with open(path, "wb") as f:
    f.write(cmd("SELECT", "0"))
    for i in range(n):
        kid = "key_01m8%022d" % i
        f.write(cmd("HSET", kid, "name", "service key %d" % i,
                    "owner", "usr_01m840qzxe405pt2gg7smef00t",
                    "prefix", "kl_live_01m8%04d" % (i % 10000),
                    "hash", "%064x" % (i * 2654435761),
                    "created_at", "2026-11-23T11:01:13.811Z",
                    "status", "active"))
PY
}

redis_load() {  # redis_load DIR -> "load_ms rss_kb"
  local port pid ms
  port=$(free_port)
  warm "$1"
  redis-server --port "$port" --dir "$1" --appendonly yes --appendfilename appendonly.aof \
    --save '' --daemonize no >"$1/redis.log" 2>&1 &
  pid=$!; BENCH_PIDS+=("$pid")
  for _ in $(seq 1 2000); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.01; done
  ms=$(sed -n 's/.*DB loaded from append only file: \([0-9.]*\) seconds.*/\1/p' "$1/redis.log" | tail -1)
  echo "$(python3 -c "print(float('${ms:-0}')*1000)") $(rss_kb "$pid")"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid"
  wait "$pid" 2>/dev/null || true
}

part() { case " ${PARTS:-replay memory snapshot} " in *" $1 "*) return 0;; esac; return 1; }

if part replay; then
  echo "generating $N events and an AOF of $N commands..."
  "$KL_BUILD/kl_genlog" "$BENCH_TMP/big" "$N"
  make_aof "$BENCH_TMP/big.aof" "$N"

  klr=(); rdr=()
  for r in $(seq 1 "$ROUNDS"); do
    read -r kms ktotal _ <<<"$(kl_start "$BENCH_TMP/big")"
    # Redis 7 moves a legacy AOF into appendonlydir as it loads it: start
    # every round from a fresh copy.
    rm -rf "$BENCH_TMP/redis-big"; mkdir -p "$BENCH_TMP/redis-big"
    cp "$BENCH_TMP/big.aof" "$BENCH_TMP/redis-big/appendonly.aof"
    read -r rms _ <<<"$(redis_load "$BENCH_TMP/redis-big")"
    klr+=("$(python3 -c "print($N/($kms/1000))")")
    rdr+=("$(python3 -c "print($N/($rms/1000) if $rms else 0)")")
    echo "round $r: keyledger replay ${kms} ms (start to ready ${ktotal} ms), redis AOF load ${rms} ms"
  done
  k=$(median "${klr[@]}"); r=$(median "${rdr[@]}")
  printf "startup replay of %d events: keyledger %.0f events/s, redis %.0f commands/s, ratio %s (goal >= 2.0)\n" \
    "$N" "$k" "$r" "$(ratio "$k" "$r")"

fi

if part memory; then
  "$KL_BUILD/kl_genlog" "$BENCH_TMP/empty" 0
  "$KL_BUILD/kl_genlog" "$BENCH_TMP/mem" "$MEM_N"
  mkdir -p "$BENCH_TMP/redis-empty" "$BENCH_TMP/redis-mem"
  make_aof "$BENCH_TMP/redis-empty/appendonly.aof" 0
  make_aof "$BENCH_TMP/redis-mem/appendonly.aof" "$MEM_N"
  # Huge pages make the resident size of one start vary by up to a couple of
  # 2 MB pages: the median of ROUNDS starts of each.
  klm=(); rdm=()
  for r in $(seq 1 "$ROUNDS"); do
    read -r _ _ kl0 <<<"$(kl_start "$BENCH_TMP/empty")"
    read -r _ _ kl1 <<<"$(kl_start "$BENCH_TMP/mem")"
    read -r _ rd0 <<<"$(redis_load "$BENCH_TMP/redis-empty")"
    read -r _ rd1 <<<"$(redis_load "$BENCH_TMP/redis-mem")"
    klm+=($(( kl1 - kl0 ))); rdm+=($(( rd1 - rd0 )))
    echo "round $r: keyledger $(( (kl1 - kl0) * 1024 / MEM_N )) B/key, redis $(( (rd1 - rd0) * 1024 / MEM_N )) B/key"
  done
  kb=$(median "${klm[@]}"); rb=$(median "${rdm[@]}")
  kb=${kb%.*}; rb=${rb%.*}
  printf "memory for %d keys: keyledger %d KiB (%d B/key), redis %d KiB (%d B/key), ratio %s (goal <= 1.0)\n" \
    "$MEM_N" "$kb" $(( kb * 1024 / MEM_N )) "$rb" $(( rb * 1024 / MEM_N )) "$(ratio "$kb" "$rb")"

fi

# 3. A snapshot and a short tail against the full replay of the same log.
if part snapshot; then
  "$KL_BUILD/kl_genlog" --print-secret "$BENCH_TMP/tail.keys" --spread "$TAIL" \
    "$BENCH_TMP/snap" "$N" >/dev/null
  "$KL_BUILD/keyledger" snapshot --data "$BENCH_TMP/snap" >/dev/null
  port=$(free_port)
  start_keyledgerd "$BENCH_TMP/snap" "$port"
  python3 - "$port" "$BENCH_TMP/tail.keys" <<'PY'
import http.client, json, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for secret in open(sys.argv[2]).read().split():
    conn.request("POST", "/v1/keys/verify", json.dumps({"key": secret}),
                 {"Content-Type": "application/json"})
    conn.getresponse().read()
PY
  kill "$KL_PID"; wait "$KL_PID" 2>/dev/null || true

  # start_ms DATA -> "LOAD TOTAL": the daemon's own "... in LOAD ms; ready"
  # (the state: snapshot and tail, or the whole replay), and the whole start
  # from exec to that line (with opening the log, which checks every
  # segment's records first), from the line's own time stamp.
  start_ms() {   # start_ms DATA -> "LOAD TOTAL WARM_MS"
    local port ms t0 ready w
    port=$(free_port)
    warm "$1"
    w=$(host_warm)
    t0=$(date +%s%3N)
    start_keyledgerd "$1" "$port"
    ms=$(sed -n 's/.* in \([0-9.]*\) ms; ready.*/\1/p' "$BENCH_TMP/keyledgerd.$port.log")
    ready=$(sed -n 's/^\([^ ]*\) .* ms; ready.*/\1/p' "$BENCH_TMP/keyledgerd.$port.log")
    kill "$KL_PID"; wait "$KL_PID" 2>/dev/null || true
    echo "$ms $(( $(date -d "$ready" +%s%3N) - t0 )) $w"
  }
  # This VM's host takes back guest memory that stays free for a few
  # seconds, and backing it again on first touch costs over a millisecond
  # per MB: as much as the whole load of a snapshot, and more or less of it
  # by chance. Right before each start (its files read into the page
  # cache first) a short process touches and frees WARM_MB of memory on
  # huge pages, the kind the daemon's heap is on (touching 4 KiB pages did
  # not help: the next huge-page allocation still cost 1.6 ms/MB against
  # 0.06 after a huge-page touch, measured), so that both starts find
  # memory the host backs, as a host with its memory to itself always
  # does; the time the touch took says what state the machine was in.
  WARM_MB=${WARM_MB:-1024}
  host_warm() {   # -> ms it took to touch WARM_MB
    python3 - "$WARM_MB" <<'PY'
import mmap, sys, time
size = int(sys.argv[1]) << 20
t = time.monotonic()
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
for off in range(0, size, 4096):
    m[off] = 1
m.close()
print(round((time.monotonic() - t) * 1000))
PY
  }
  snap=$(ls "$BENCH_TMP/snap"/snapshot-*.kls)
  sn=(); fu=(); snt=(); fut=()
  for r in $(seq 1 "$ROUNDS"); do
    # A clean stop may flush usage or raise alerts: the tail only grows.
    read -r s_ms s_tot w1 <<<"$(start_ms "$BENCH_TMP/snap")"
    mv "$snap" "$BENCH_TMP/aside.kls"
    read -r f_ms f_tot w2 <<<"$(start_ms "$BENCH_TMP/snap")"
    mv "$BENCH_TMP/aside.kls" "$snap"
    sn+=("$s_ms"); fu+=("$f_ms"); snt+=("$s_tot"); fut+=("$f_tot")
    echo "round $r: from the snapshot ${s_ms} ms (exec to ready ${s_tot} ms), full replay ${f_ms} ms (${f_tot} ms); touching $WARM_MB MB before each took $w1 / $w2 ms"
  done
  s=$(median "${sn[@]}"); f=$(median "${fu[@]}")
  st=$(median "${snt[@]}"); ft=$(median "${fut[@]}")
  printf "start with a snapshot of %d events and a tail of %d: %.0f ms, full replay %.0f ms, %sx faster (goal >= 10)\n" \
    "$N" "$TAIL" "$s" "$f" "$(ratio "$f" "$s")"
  printf "  exec to ready, opening the log included: %.0f ms against %.0f ms, %sx faster\n" \
    "$st" "$ft" "$(ratio "$ft" "$st")"
fi
