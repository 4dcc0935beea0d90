#!/usr/bin/env bash
# Builds keyledger and runs the daemon on ./data, creating it on first run
# (the owner key is printed once). Extra arguments go to keyledgerd, e.g.
#   ./run.sh --listen 0.0.0.0:8080
# KL_ORG and KL_OWNER_EMAIL name the first organization and its owner.
set -euo pipefail
cd "$(dirname "$0")"
. .ci/deps.sh
kl_install_deps
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
if [ ! -f data/MANIFEST ]; then
  build/keyledger init --data data --org "${KL_ORG:-My Organization}" \
    --owner-email "${KL_OWNER_EMAIL:-owner@example.com}"
fi
exec build/keyledgerd --data data "$@"
