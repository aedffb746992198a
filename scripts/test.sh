#!/usr/bin/env bash
# Runs every test of the project on a fresh machine that has the Rust toolchain: installs what the
# tests need (Mesa's software Vulkan for the wgpu tests, Chromium for the browser tests, the wasm32
# target, the npm test packages), then builds the native CLI (with CUDA), the npm package from the
# wasm crate, and runs lints, Rust tests and the headless-Chromium tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's heading also says how long the run has taken so far (CI has a time limit).
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || packages+=(mesa-vulkan-drivers libvulkan1)
command -v chromium >/dev/null || packages+=(chromium)
command -v node >/dev/null || packages+=(nodejs npm)
if [ ${#packages[@]} -gt 0 ]; then
    step "installing ${packages[*]} (software Vulkan for the wgpu tests, Chromium and Node for the browser tests)"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
fi

step "toolchain components"
rustup target add wasm32-unknown-unknown
rustup component add rustfmt clippy

step "format"
cargo fmt --all --check

step "native release build (CLI with the CPU and wgpu backends)"
cargo build --release --locked

step "tests"
cargo test --release --locked

step "clippy (with the cuda feature, so that the CUDA backend's code is type-checked too)"
cargo clippy --release --locked --all-targets --features instaflow-cli/cuda -- -D warnings

step "npm package web/ from the wasm crate (wasm-bindgen CLI pinned to Cargo.lock)"
cargo run --release --locked -q -p xtask -- build-web
cargo clippy --release --locked --target wasm32-unknown-unknown -p instaflow-wasm -- -D warnings

step "browser tests (headless Chromium: WebGPU on SwiftShader, wasm CPU fallback, npm pack)"
(cd tests/browser && npm ci --no-audit --no-fund)
# Two test files at a time: a software WebGPU adapter compiles shaders on one core.
node --test --test-concurrency=2 tests/browser/workers.test.mjs tests/browser/stream.test.mjs \
    tests/browser/page.test.mjs tests/browser/package.test.mjs
echo "screenshots and the packed tarball: target/browser-tests/"

step "all tests passed"
