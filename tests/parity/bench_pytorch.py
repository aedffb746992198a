"""The `instaflow bench` workload in PyTorch + diffusers (CPU, fp32, random SD-1.5 weights).

Prints JSON with the same fields as `instaflow bench`, plus each stage's FLOPs (counted by
torch's FlopCounterMode) and, with --model, the end-to-end InstaFlow loop (pipeline_rf.py, one
Euler step) on a diffusers folder. Used by scripts/bench-vs-pytorch.sh.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def flops(fn):
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


def end_to_end(folder, prompt, batch, out, device="cpu", dtype=torch.float32):
    """Load a diffusers folder, encode, one Euler step of the rectified flow, decode, write PNGs:
    what `instaflow generate --model DIR` does. Returns (seconds, seconds per stage)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval().to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval().to(device)
    sync()
    load = time.perf_counter()
    ids = tok([prompt] * batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    emb = text(ids.to(device)).last_hidden_state
    sync()
    encoded = time.perf_counter()
    s = unet.config.sample_size
    z = torch.randn(batch, 4, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    z = z + unet(z, torch.tensor([1000.0], device=device), encoder_hidden_states=emb).sample
    sync()
    stepped = time.perf_counter()
    image = vae.decode(z / vae.config.scaling_factor).sample
    pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = time.perf_counter()
    for i, p in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(p)).save(f"{out}-{i}.png")
    end = time.perf_counter()
    return end - start, {"load": load - start, "text_encode": encoded - load, "unet": stepped - encoded,
                         "decode": decoded - stepped}


def median_s(repeats, fn):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return first, times[len(times) // 2]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="a diffusers folder: time the end-to-end InstaFlow loop on it instead")
    ap.add_argument("--batch", type=int, default=1, help="images per end-to-end run")
    ap.add_argument("--out", default="/tmp/pytorch-e2e", help="PNG path prefix of the end-to-end run")
    ap.add_argument("--device", default="cpu", help="end to end on this torch device (cpu, cuda)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="end-to-end weights and compute")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        dtype = torch.float16 if args.dtype == "f16" else torch.float32
        runs = [end_to_end(args.model, "a photo of a cat", args.batch, args.out, args.device, dtype)
                for _ in range(max(args.repeats, 1))]
        runs.sort(key=lambda r: r[0])
        total, stages = runs[len(runs) // 2]
        print(json.dumps({"end_to_end_s": total, "stages_s": stages, "batch": args.batch,
                          "device": args.device, "dtype": args.dtype,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}, indent=2))
        return
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, max_position_embeddings=77)).eval()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    ids = torch.tensor([[49406, 320, 1929, 2038, 49407] + [49407] * 72])
    l = args.latent
    _, text_s = median_s(args.repeats, lambda: text(ids))
    ctx, sample = torch.randn(1, 77, 768), torch.randn(1, 4, l, l)
    _, unet_s = median_s(args.repeats, lambda: unet(sample, torch.tensor([1000.0]), encoder_hidden_states=ctx))
    latents = torch.randn(1, 4, l, l)
    _, vae_s = median_s(args.repeats, lambda: vae.decode(latents))
    result = {
        "backend": f"pytorch {torch.__version__} cpu, {args.threads} threads",
        "latent": l, "image": 8 * l,
        "text_encode_s": text_s, "unet_s": unet_s, "vae_decode_s": vae_s,
        "text_encode_flops": flops(lambda: text(ids)),
        "unet_flops": flops(lambda: unet(sample, torch.tensor([1000.0]), encoder_hidden_states=ctx)),
        "vae_decode_flops": flops(lambda: vae.decode(latents)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
