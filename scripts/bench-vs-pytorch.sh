#!/usr/bin/env bash
# Times text encode, UNet forward and VAE decode at SD-1.5 size with `instaflow bench`, then the
# same in PyTorch + diffusers when a Python with them is given (PYTHON=…/bin/python), in one run,
# and prints our/PyTorch ratios and peak memory.
#   PYTHON=V/bin/python scripts/bench-vs-pytorch.sh [--backend cpu] [--latent 64]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/bench}
mkdir -p "$out"
cargo build --release -q -p instaflow-cli
./target/release/instaflow "$@" bench --json "$out/instaflow.json" >/dev/null
python=${PYTHON:-python3}
latent=64
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --latent ] && { j=$((i + 1)); latent=${!j}; }; done
if ! "$python" -c "import torch, diffusers, transformers" 2>/dev/null; then
    echo "PyTorch/diffusers not found for $python: showing our numbers only"
    cat "$out/instaflow.json"
    exit 0
fi
"$python" tests/parity/bench_pytorch.py --latent "$latent" > "$out/pytorch.json"
"$python" - "$out/instaflow.json" "$out/pytorch.json" <<'PY'
import json, sys
ours, ref = (json.load(open(p)) for p in sys.argv[1:3])
print(f"instaflow: {ours['backend']}   reference: {ref['backend']}   image {ours['image']}²")
print(f"{'stage':<14}{'instaflow s':>13}{'PyTorch s':>11}{'ratio':>8}")
for key, name in [("text_encode_s", "text encode"), ("unet_s", "UNet forward"), ("vae_decode_s", "VAE decode")]:
    print(f"{name:<14}{ours[key]:>13.2f}{ref[key]:>11.2f}{ours[key] / ref[key]:>8.2f}")
print(f"{'peak RSS MiB':<14}{ours['peak_rss_mib']:>13.0f}{ref['peak_rss_mib']:>11.0f}{ours['peak_rss_mib'] / ref['peak_rss_mib']:>8.2f}")
PY
