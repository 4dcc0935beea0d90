#!/usr/bin/env bash
# Durable writes: key creations per second with --fsync always and 32
# concurrent clients, against Redis SET with appendfsync always at the same
# concurrency, three rounds each, medians compared. Goal: ratio >= 1.0.
. "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}

data=$BENCH_TMP/data
"$KL_BUILD/keyledger" init --data "$data" --org Bench --owner-email b@bench.test --json \
  > "$BENCH_TMP/init.json"
key=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["key"])' "$BENCH_TMP/init.json")
port=$(free_port)
start_keyledgerd "$data" "$port" --fsync always
cat > "$BENCH_TMP/create.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '{"name":"bench key","permissions":{"access":"full"}}'
LUA

rport=$(free_port)
mkdir -p "$BENCH_TMP/redis"
redis-server --port "$rport" --dir "$BENCH_TMP/redis" --appendonly yes \
  --appendfsync always --save '' --daemonize no >/dev/null &
BENCH_PIDS+=("$!")
for _ in $(seq 1 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done

kl=(); rd=()
for r in $(seq 1 "$ROUNDS"); do
  out=$(wrk -t2 -c32 -d"${SECS}s" -s "$BENCH_TMP/create.lua" "http://127.0.0.1:$port/v1/api-keys")
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  [ -n "$non2xx" ] && echo "warning: $non2xx non-2xx answers" >&2
  kl+=("$(echo "$out" | awk '/Requests\/sec/ {print $2}')")
  n=$(python3 -c "print(int(float('${kl[-1]}')*$SECS))")
  rd+=("$(redis-benchmark -p "$rport" -c 32 -n "$n" -t set -r 1000000 -q \
         | tr '\r' '\n' | awk '/^SET: / {print $2}' | tail -1)")
  echo "round $r: keyledger ${kl[-1]} creates/s, redis ${rd[-1]} SET/s"
done
k=$(median "${kl[@]}"); r=$(median "${rd[@]}")
echo "durable writes (fsync always, 32 clients): keyledger $k/s, redis $r/s, ratio $(ratio "$k" "$r") (goal >= 1.0)"
