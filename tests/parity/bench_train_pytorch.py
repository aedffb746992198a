"""Training and pair-generation throughput of the same model in PyTorch (diffusers + transformers).

Loads a model folder written by `instaflow train` (diffusers layout: unet/, text_encoder/), so it
also checks that diffusers reads our exported weights. Prints one JSON line.

    python bench_train_pytorch.py MODEL_DIR --batch 64 --steps 20 --pairs 256 --euler 16
"""

import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--pairs", type=int, default=256)
p.add_argument("--euler", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32)
text = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder", torch_dtype=torch.float32)
c = unet.config
shape = (c.in_channels, c.sample_size, c.sample_size)
ids = torch.randint(0, 49407, (a.batch, 77))

# Training: the same step as `instaflow train` (rectified-flow loss, AdamW, grad clipping, EMA).
params = list(unet.parameters()) + list(text.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
ema = [q.detach().clone() for q in params]
x1 = torch.randn(a.batch, *shape)


def step():
    x0 = torch.randn_like(x1)
    t = torch.rand(a.batch)
    xt = x0 + (x1 - x0) * t[:, None, None, None]
    v = unet(xt, 1000 * (1 - t), text(ids)[0]).sample
    loss = ((v - (x1 - x0)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        for e, q in zip(ema, params):
            e.mul_(0.995).add_(q, alpha=0.005)


step()  # warm-up
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
train_s = time.perf_counter() - t0

# Pair generation: Euler N from noise, text encoded once per batch.
with torch.no_grad():
    t0 = time.perf_counter()
    done = 0
    while done < a.pairs:
        n = min(a.batch, a.pairs - done)
        emb = text(ids[:n])[0]
        z = torch.randn(n, *shape)
        for i in range(a.euler):
            tau = torch.full((n,), 1000 * (1 - i / a.euler))
            z = z + unet(z, tau, emb).sample / a.euler
        done += n
    pairs_s = time.perf_counter() - t0

print(json.dumps({
    "torch": torch.__version__,
    "threads": a.threads,
    "train_samples_per_s": a.steps * a.batch / train_s,
    "pairs_per_s": a.pairs / pairs_s,
    "euler_steps": a.euler,
}))
