"""Make tiny random diffusers-format models and golden outputs for the parity tests.

Run once (CI runs no Python; the outputs are committed):
    python3 -m venv V && V/bin/pip install -r tests/parity/requirements.txt
    V/bin/python tests/parity/make_goldens.py --bpe PATH/bpe_simple_vocab_16e6.txt.gz

The CLIP BPE file ships in the PyPI wheel of open-clip-torch (open_clip/bpe_simple_vocab_16e6.txt.gz).
Outputs: assets/clip-tokenizer/{vocab.json,merges.txt}, tests/fixtures/parity/<config>/ (a diffusers
folder plus goldens.safetensors) and tests/fixtures/parity/tokens.json.
"""

import argparse
import gzip
import json
import os
import shutil

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_DIR = os.path.join(ROOT, "assets", "clip-tokenizer")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parity")


def bytes_to_unicode():
    """CLIP's reversible byte → printable-unicode table (as in openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(bpe_path):
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


TRICKY_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT riding a HORSE!!!",
    "red heart",
    "",
    "   spaces   and\ttabs\nnewlines  ",
    "it's a dog's life, isn't it? (yes) -- 100% [sure] {ok}",
    "café déjà vu naïve Zürich",
    "emoji ❤️ 🚀 🐱‍👤 and 😀",
    "numbers 1234567 and 3.14159",
    "hyphen-ated under_score slash/path",
    " ".join(["very long prompt"] * 40),
]


def tokenizer():
    return CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"), os.path.join(TOKENIZER_DIR, "merges.txt"))


def write_tokens():
    tok = tokenizer()
    cases = []
    for p in TRICKY_PROMPTS:
        ids = tok(p, padding="max_length", max_length=77, truncation=True).input_ids
        cases.append({"prompt": p, "ids": ids})
    with open(os.path.join(FIXTURES, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)


def perturb(model, gen, scale):
    """Move every parameter away from its initial value (norm weights of 1, biases of 0, …)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def save_diffusers(model, folder, dtype, weights_name):
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder) if hasattr(model, "save_config") else model.config.to_json_file(os.path.join(folder, "config.json"))
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, weights_name), metadata={"format": "pt"})


CONFIGS = {
    # 1×1-conv projections, int-valued fields, f32 weights.
    "conv-f32": dict(
        dtype=torch.float32,
        unet=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8),
        vae=dict(sample_size=32, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=8, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=49408, hidden_act="quick_gelu"),
    ),
    # Linear projections, list-valued fields, three resolutions, fp16 weights.
    "linear-f16": dict(
        dtype=torch.float16,
        unet=dict(sample_size=8, block_out_channels=(16, 32, 48), layers_per_block=(2, 1, 1),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=12, attention_head_dim=(2, 4, 2), norm_num_groups=4,
                  use_linear_projection=True, transformer_layers_per_block=(1, 2, 1),
                  flip_sin_to_cos=False, freq_shift=1),
        vae=dict(sample_size=32, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 scaling_factor=0.5),
        text=dict(hidden_size=12, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                  vocab_size=49408, hidden_act="gelu"),
    ),
    # bf16 weights, 2 heads, one resolution-changing block each way.
    "small-bf16": dict(
        dtype=torch.bfloat16,
        unet=dict(sample_size=8, block_out_channels=(24, 24), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=8, attention_head_dim=2, norm_num_groups=6),
        vae=dict(sample_size=16, block_out_channels=(12, 24), layers_per_block=1, norm_num_groups=6,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=8, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  vocab_size=49408, hidden_act="quick_gelu"),
    ),
}


@torch.no_grad()
def make(name, spec, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    folder = os.path.join(FIXTURES, name)
    shutil.rmtree(folder, ignore_errors=True)
    dtype = spec["dtype"]

    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    text = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **spec["text"])).eval()
    for m in (unet, vae, text):
        perturb(m, gen, 0.05)
    save_diffusers(unet, os.path.join(folder, "unet"), dtype, "diffusion_pytorch_model.safetensors")
    save_diffusers(vae, os.path.join(folder, "vae"), dtype, "diffusion_pytorch_model.safetensors")
    os.makedirs(os.path.join(folder, "text_encoder"), exist_ok=True)
    text.config.to_json_file(os.path.join(folder, "text_encoder", "config.json"))
    save_file({k: v.to(dtype).contiguous() for k, v in text.state_dict().items()},
              os.path.join(folder, "text_encoder", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "RectifiedFlowPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"]}, f, indent=1)

    # Reload so goldens come from exactly the stored (possibly half-precision) weights, in f32.
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), torch_dtype=torch.float32).eval()

    g = {}
    tok = tokenizer()
    prompts = ["a red heart", "A Photograph of an astronaut, riding a horse!"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    g["text.ids"] = ids.to(torch.int64)
    g["text.hidden"] = text(ids).last_hidden_state

    h = w = unet.config.sample_size
    cross = unet.config.cross_attention_dim
    g["unet.sample"] = torch.randn(3, 4, h, w, generator=gen)
    g["unet.timesteps"] = torch.tensor([1000.0, 2000.0 / 3.0, 12.5])
    g["unet.context"] = torch.randn(3, 77, cross, generator=gen)
    g["unet.out"] = unet(g["unet.sample"], g["unet.timesteps"], encoder_hidden_states=g["unet.context"]).sample

    s = vae.config.sample_size
    g["vae.image"] = torch.rand(2, 3, s, s, generator=gen) * 2 - 1
    dist = vae.encode(g["vae.image"]).latent_dist
    g["vae.mean"], g["vae.logvar"] = dist.mean, dist.logvar
    g["vae.latents"] = torch.randn(2, 4, s // 2 ** (len(vae.config.block_out_channels) - 1), s // 2 ** (len(vae.config.block_out_channels) - 1), generator=gen)
    g["vae.decoded"] = vae.decode(g["vae.latents"]).sample

    # The InstaFlow sampling loop of pipeline_rf.py, for N = 1 (α = 1) and N = 4 (α = 1.5).
    emb = text(tok(["red heart"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids).last_hidden_state
    neg = text(tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids).last_hidden_state
    noise = torch.randn(1, 4, h, w, generator=gen)
    g["pipeline.noise"] = noise
    for steps, alpha in [(1, 1.0), (4, 1.5)]:
        z = noise.clone()
        for i in range(steps):
            tau = torch.tensor([(1.0 - i / steps) * 1000.0])
            v = unet(z, tau, encoder_hidden_states=emb).sample
            if alpha != 1.0:
                v_neg = unet(z, tau, encoder_hidden_states=neg).sample
                v = v_neg + alpha * (v - v_neg)
            z = z + v / steps
        g[f"pipeline.n{steps}.latents"] = z
        image = vae.decode(z / vae.config.scaling_factor).sample
        g[f"pipeline.n{steps}.pixels"] = (image / 2 + 0.5).clamp(0, 1)

    save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(folder, "goldens.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe", required=True, help="bpe_simple_vocab_16e6.txt.gz from the open-clip-torch wheel")
    args = ap.parse_args()
    torch.set_num_threads(2)
    write_tokenizer(args.bpe)
    os.makedirs(FIXTURES, exist_ok=True)
    write_tokens()
    for i, (name, spec) in enumerate(CONFIGS.items()):
        make(name, spec, seed=100 + i)
    print("written", FIXTURES)


if __name__ == "__main__":
    main()
