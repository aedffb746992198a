"""The `instaflow bench` workload in PyTorch + diffusers (CPU, fp32, random SD-1.5 weights).

Prints JSON with the same fields as `instaflow bench`. Used by scripts/bench-vs-pytorch.sh.
"""

import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    print(json.dumps({
        "backend": f"pytorch {torch.__version__} cpu, {args.threads} threads",
        "latent": l, "image": 8 * l,
        "text_encode_s": text_s, "unet_s": unet_s, "vae_decode_s": vae_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }, indent=2))


if __name__ == "__main__":
    main()
