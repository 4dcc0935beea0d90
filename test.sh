#!/usr/bin/env bash
# Builds keyledger twice and runs every test on each build: a release build
# with warnings as errors, then one with AddressSanitizer and
# UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")"
. .ci/deps.sh
kl_install_deps
jobs=$(nproc)
for variant in release asan; do
  dir=build-test-$variant
  flags=(-DCMAKE_BUILD_TYPE=Release -DKL_WERROR=ON)
  [ $variant = asan ] && flags=(-DCMAKE_BUILD_TYPE=Debug -DKL_WERROR=ON -DKL_SANITIZE=ON)
  echo "== $variant build"
  cmake -S . -B "$dir" "${flags[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs" >/dev/null
  echo "== $variant tests"
  (cd "$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     ctest --output-on-failure -j"$jobs")
done
