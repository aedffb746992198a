#!/usr/bin/env bash
# Manual smoke check of the wasm package in headless Chromium (WebGPU on SwiftShader, and the wasm
# CPU fallback) against the native CLI, on a tiny parity model. Needs: Debian `chromium`,
# `cargo install wasm-bindgen-cli --version <the wasm-bindgen version in Cargo.lock>`, and
# `npm install` in tests/browser. Prints latency, backend and the largest pixel difference.
set -euo pipefail
cd "$(dirname "$0")/.."
web=target/web
model=$web/model
cargo build --release -q --target wasm32-unknown-unknown -p instaflow-wasm
wasm-bindgen --target web --out-dir $web/pkg target/wasm32-unknown-unknown/release/instaflow_wasm.wasm
rm -rf $model && mkdir -p $model/tokenizer
cp -r tests/fixtures/parity/linear-f16/{unet,vae,text_encoder} $model/
cp assets/clip-tokenizer/* $model/tokenizer/
cargo build --release -q -p instaflow-cli
./target/release/instaflow --backend cpu generate "red heart" --seed 3 --model $model --out $web/native.png >/dev/null 2>&1
files=$(cd $model && find . -type f | sed 's|^\./||' | paste -sd, -)
python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
for gpu in 1 0; do
    url="http://127.0.0.1:8765/tests/browser/smoke.html?model=/$model&files=$files&seed=3&gpu=$gpu&native=/$web/native.png"
    node tests/browser/smoke.mjs "$url" "$web/browser-gpu$gpu.json"
done
