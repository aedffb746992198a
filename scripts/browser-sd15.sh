#!/usr/bin/env bash
# The browser at full size: an SD-1.5-size diffusers folder (random weights, made once by
# `instaflow random-model`, 2.1 GB as f16) streamed by the npm package into WebGPU (SwiftShader in
# headless Chromium), one step at 64×64, against the native CLI. Too slow for every test run
# (several minutes); `./scripts/test.sh` runs the same loader on a narrow model.
#   scripts/browser-sd15.sh [--dtype f16|f32] [--size 64]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
cargo run --release --locked -q -p xtask -- build-web
(cd tests/browser && npm ci --no-audit --no-fund --silent)
node tests/browser/sd15.mjs "$@"
