#!/usr/bin/env bash
# Browser benchmark: one-step latency of the built-in model in headless Chromium (WebGPU on
# SwiftShader and the wasm CPU fallback) next to the native CLI, and the wasm bundle size.
# Needs what ./scripts/test.sh installs (chromium, tests/browser/node_modules). RUNS=N to change.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p instaflow-cli -p xtask
cargo run --release --locked -q -p xtask -- build-web
node tests/browser/bench.mjs
