#!/usr/bin/env bash
# One short check on a machine with an NVIDIA GPU (under 8 minutes once built):
#  1. builds the CLI with CUDA (`--features cuda`) unless BIN names a built one;
#  2. numerics: the parity model's latents from `generate` on cuda and wgpu (f32) against the CPU
#     backend, whose numbers the parity tests hold to diffusers — same noise, same prompt;
#  3. speed and memory: one-step 512² on a random SD-1.5-size folder, f32 and f16, on cuda and
#     wgpu, and PyTorch + diffusers on the same GPU when a Python with them is given (PYTHON=…);
#  4. data-parallel training: one GPU against all of them;
#  5. mixed-precision training: f32, f16 and bf16 passes (speed and GPU memory);
#  6. training from Stable Diffusion at SD-1.5 size: 2-RF steps per mode, GPU memory vs the plan;
#  7. the SD recipe (pairs → 2-RF → L2 distillation → generate) on the tiny parity model;
# and prints one table per check.
#   scripts/gpu-check.sh            # BIN=path/to/instaflow to skip the build
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-target/gpu-check}
mkdir -p "$out"
bin=${BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --locked -q -p instaflow-cli --features cuda
    bin=./target/release/instaflow
fi
$bin backends | tee "$out/backends.txt"

# 2. numerics on the parity model (tokenizer from assets/).
model="$out/parity-model"
rm -rf "$model" && mkdir -p "$model/tokenizer"
cp -r tests/fixtures/parity/conv-f32/{unet,vae,text_encoder,model_index.json} "$model/"
cp assets/clip-tokenizer/{vocab.json,merges.txt} "$model/tokenizer/"
rows=()
for backend in cpu cuda wgpu; do
    if $bin --backend "$backend" generate "a red heart" --model "$model" --seed 3 --steps 2 \
        --out "$out/parity-$backend.png" --save-latents "$out/parity-$backend.safetensors" \
        >/dev/null 2>"$out/parity-$backend.err"; then
        rows+=("$backend")
    else
        echo "parity on $backend: failed ($(tail -1 "$out/parity-$backend.err"))"
    fi
done
python3 - "$out" "${rows[@]}" <<'EOF'
import json, struct, sys
out, backends = sys.argv[1], sys.argv[2:]
def latents(b):
    raw = open(f"{out}/parity-{b}.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])["latents"]
    s, e = h["data_offsets"]
    data = raw[8 + n + s:8 + n + e]
    return struct.unpack(f"<{len(data) // 4}f", data)
ref = latents("cpu")
for b in backends:
    if b != "cpu":
        d = max(abs(x - y) for x, y in zip(ref, latents(b)))
        print(f"parity {b:5} vs cpu: max |Δ| latents {d:.2e}  ({'ok' if d <= 1e-3 else 'FAIL'} at 1e-3)")
EOF

# 3. one-step 512² on an SD-1.5-size folder.
sd=${SD:-$out/sd15-random-f32}
[ -f "$sd/model_index.json" ] || $bin random-model --preset sd15 --dtype f32 --seed 1 --out "$sd" >/dev/null
printf '\n%-8s %-9s %9s %9s %9s %9s %11s\n' backend precision load_s text_s unet_s vae_s weights_GB
for backend in cuda wgpu; do
    for precision in f32 f16; do
        for run in warmup timed; do
            $bin --backend "$backend" generate "a photo of a cat" --model "$sd" --precision "$precision" \
                --json --out "$out/sd-$backend-$precision.png" >"$out/sd-$backend-$precision.json" \
                2>"$out/sd-$backend-$precision.err" || { echo "$backend $precision: failed ($(tail -1 "$out/sd-$backend-$precision.err"))"; break; }
        done
        [ -s "$out/sd-$backend-$precision.json" ] && python3 -c "
import json,sys; d=json.load(open(sys.argv[1])); t=d['timings_ms']; m=d.get('device_memory_bytes') or {}
print(f\"{sys.argv[2]:8} {sys.argv[3]:9} {t['load']/1e3:9.2f} {t['text_encode']/1e3:9.3f} {sum(t['unet_steps'])/1e3:9.3f} {t['decode']/1e3:9.3f} {(m.get('weights') or 0)/1e9:11.2f}\")
print(f\"{'':8} peak device memory in use {(m.get('peak_in_use') or 0)/1e9:.2f} GB, reserved {(m.get('peak_reserved') or 0)/1e9:.2f} GB\")" \
            "$out/sd-$backend-$precision.json" "$backend" "$precision" || true
    done
done
if [ -n "${PYTHON:-}" ] && $PYTHON -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null; then
    for dtype in f32 f16; do
        # Median of three runs.
        $PYTHON tests/parity/bench_pytorch.py --model "$sd" --batch 1 --device cuda --dtype "$dtype" \
            --repeats 3 --out "$out/pytorch-$dtype" || echo "PyTorch $dtype: failed"
    done
else
    echo "PyTorch on the GPU: skipped (set PYTHON to a Python with torch (CUDA) and diffusers)"
fi

# 4. Data-parallel training: one GPU vs all of them, same global batch (samples/s and all-reduce).
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 1 ]; then
    data=tests/fixtures/data/mnist-8
    all=$(seq -s, 0 $((gpus - 1)))
    printf '\n%-22s %12s %16s\n' devices samples_per_s all_reduce_s
    for devices in "cuda:0" "cuda:$all"; do
        rm -rf "$out/dp"
        $bin -q train --devices "$devices" --size small --batch $((32 * gpus)) --steps 30 \
            --checkpoint-every 1000 --data "$data" --out "$out/dp" >/dev/null 2>"$out/dp.err" \
            || { echo "$devices: failed ($(tail -1 "$out/dp.err"))"; continue; }
        python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(f\"{sys.argv[2]:22} {d['samples_per_second']:12.1f} {max(w['all_reduce_seconds'] for w in d['workers']):16.2f}\")" \
            "$out/dp/train.json" "$devices"
    done
fi

# 5. Mixed-precision training on one GPU: samples/s and the device memory of f32, f16 and bf16
#    passes (`--precision`; the weights stay f32), `base` model on 16×16 emoji, batch 64.
if [ "$gpus" -ge 1 ]; then
    data=tests/fixtures/data/emoji-16
    printf '\n%-10s %12s %12s %14s\n' precision samples_per_s final_loss peak_gpu_MiB
    for precision in f32 f16 bf16; do
        rm -rf "$out/mp"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 -i 0 \
            >"$out/mp-$precision.mem" 2>/dev/null &
        smi=$!
        $bin -q --backend cuda train --size base --batch 64 --steps 30 --precision "$precision" \
            --checkpoint-every 1000 --data "$data" --out "$out/mp" >/dev/null 2>"$out/mp.err" \
            || echo "$precision: failed ($(tail -1 "$out/mp.err"))"
        kill $smi 2>/dev/null
        [ -f "$out/mp/train.json" ] && python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
mem=max([int(l) for l in open(sys.argv[3]) if l.strip().isdigit()] or [0])
print(f\"{sys.argv[2]:10} {d['samples_per_second']:12.1f} {d['final_loss']:12.4f} {mem:14d}\")" \
            "$out/mp/train.json" "$precision" "$out/mp-$precision.mem"
    done
fi

# 6. Training from Stable Diffusion at SD-1.5 size on one GPU: a few 2-RF steps on DPM-Solver
#    pairs from the random SD-1.5 folder of step 3 (UNet only, CLIP and VAE frozen), per mode —
#    samples/s, peak GPU memory, and the memory plan's figure for the same run.
if [ "$gpus" -ge 1 ]; then
    printf 'a photo of a cat\na red car\n' >"$out/prompts.txt"
    $bin -q --backend cuda reflow --model "$sd" --prompts "$out/prompts.txt" --pairs 4 \
        --solver dpm:2 --guidance 5 --out "$out/sd-pairs" >/dev/null 2>"$out/sd-pairs.err" \
        || echo "SD-1.5 pairs: failed ($(tail -1 "$out/sd-pairs.err"))"
    printf '\n%-28s %12s %14s %12s\n' mode samples_per_s peak_gpu_MiB plan_MiB
    for mode in "f32 --ema-decay 0" "f32" "bf16 --ema-decay 0"; do
        set -- $mode
        precision=$1; shift
        rm -rf "$out/sd-train"
        plan=$($bin --backend cuda train --pairs "$out/sd-pairs" --init "$sd" --batch 1 \
            --precision "$precision" "$@" --plan --out "$out/sd-train" 2>/dev/null \
            | awk '/total/ {print $(NF-1), $NF}')
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 -i 0 \
            >"$out/sd-train.mem" 2>/dev/null &
        smi=$!
        $bin -q --backend cuda train --pairs "$out/sd-pairs" --init "$sd" --batch 1 --steps 4 \
            --precision "$precision" "$@" --checkpoint-every 1000 --out "$out/sd-train" \
            >/dev/null 2>"$out/sd-train.err" || echo "$mode: failed ($(tail -1 "$out/sd-train.err"))"
        kill $smi 2>/dev/null
        [ -f "$out/sd-train/train.json" ] && python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
mem=max([int(l) for l in open(sys.argv[3]) if l.strip().isdigit()] or [0])
print(f\"{sys.argv[2]:28} {d['samples_per_second']:12.2f} {mem:14d} {sys.argv[4]:>12}\")" \
            "$out/sd-train/train.json" "$mode" "$out/sd-train.mem" "$plan"
    done
fi

# 7. The SD recipe end to end on the tiny ε-prediction parity model (a rehearsal of the README's
#    commands on CUDA): pairs at guidance 5 → 2-RF → L2 distillation at guidance 1.5.
r="$out/recipe"
rm -rf "$r" && mkdir -p "$r"
{
    $bin -q --backend cuda reflow --model "$model" --prompts "$out/prompts.txt" --pairs 8 \
        --solver dpm:4 --guidance 5 --out "$r/pairs" &&
    $bin -q --backend cuda train --pairs "$r/pairs" --init "$model" --steps 20 --batch 4 --out "$r/2rf" &&
    $bin -q --backend cuda reflow --model "$r/2rf/model" --prompts "$out/prompts.txt" --pairs 8 \
        --solver euler:4 --guidance 1.5 --out "$r/pairs2" &&
    $bin -q --backend cuda distill --pairs "$r/pairs2" --init "$r/2rf/model" --loss l2 --steps 20 \
        --batch 4 --out "$r/distill" &&
    $bin -q --backend cuda generate "a red car" --model "$r/distill/model" --out "$r/one-step.png" &&
    echo "sd-recipe rehearsal on cuda: ok ($r/one-step.png)"
} 2>"$r/err" || echo "sd-recipe rehearsal: failed ($(tail -1 "$r/err"))"
