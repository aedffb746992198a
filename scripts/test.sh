#!/usr/bin/env bash
# Runs every test of the project on a fresh machine that has the Rust toolchain: installs what the
# tests need (Mesa's software Vulkan for the wgpu tests, the wasm32 target), then builds the native
# CLI (with CUDA), the browser crate for wasm32, and runs lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    step "installing Mesa's software Vulkan driver (lavapipe) for the wgpu tests"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1
fi

step "toolchain components"
rustup target add wasm32-unknown-unknown
rustup component add rustfmt clippy

step "format"
cargo fmt --all --check

step "native release build (CLI with CPU, wgpu and CUDA backends)"
cargo build --release --locked

step "CUDA backend build (compiled in by default; cubecl-cuda loads the driver at run time)"
cargo build --release --locked --features cuda

step "tests"
cargo test --release --locked

step "clippy"
cargo clippy --release --locked --all-targets -- -D warnings

step "browser crate for wasm32 (WebGPU)"
cargo build --release --locked --target wasm32-unknown-unknown -p instaflow-wasm
cargo clippy --release --locked --target wasm32-unknown-unknown -p instaflow-wasm -- -D warnings

step "all tests passed"
