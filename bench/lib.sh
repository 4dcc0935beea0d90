# Shared by the benchmark scripts: build, temp dirs, free ports, cleanup.
# Benchmarks print figures; they are not tests and never fail on a number.
set -euo pipefail
KL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$KL_ROOT/.ci/deps.sh"
kl_install_deps wrk redis-server redis-tools nginx-light
KL_BUILD=${KL_BUILD:-$KL_ROOT/build-bench}
cmake -S "$KL_ROOT" -B "$KL_BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$KL_BUILD" -j"$(nproc)" >/dev/null
BENCH_TMP=$(mktemp -d /var/tmp/kl-bench.XXXXXX)
BENCH_PIDS=()
bench_cleanup() {
  for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$BENCH_TMP"
}
trap bench_cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() {   # wait_http URL
  for _ in $(seq 1 200); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.05
  done
  echo "not answering: $1" >&2; return 1
}

# start_keyledgerd DATA PORT [extra args]: sets KL_PID
start_keyledgerd() {
  local data=$1 port=$2; shift 2
  "$KL_BUILD/keyledgerd" --data "$data" --listen "127.0.0.1:$port" "$@" \
    2>"$BENCH_TMP/keyledgerd.$port.log" &
  KL_PID=$!
  BENCH_PIDS+=("$KL_PID")
  wait_http "http://127.0.0.1:$port/readyz"
}

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }
median() { python3 -c "import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
