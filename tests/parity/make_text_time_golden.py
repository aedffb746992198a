"""A tiny diffusers UNet with `addition_embed_type="text"` (the prompt pooled into the time
embedding) and its output on fixed inputs, for the parity test of `TextTimeEmbedding`.

Run once (CI runs no Python; the outputs are committed):
    V/bin/python tests/parity/make_text_time_golden.py
Writes tests/fixtures/parity/text-time/{unet/,goldens.safetensors}.
"""

import os
import shutil

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(ROOT, "tests", "fixtures", "parity", "text-time")


@torch.no_grad()
def main():
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    shutil.rmtree(FOLDER, ignore_errors=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text", addition_embed_type_num_heads=2,
    ).eval()
    # Away from the initial values (LayerNorms at 1/0, biases at 0) so every parameter matters.
    for p in unet.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    unet.save_pretrained(os.path.join(FOLDER, "unet"))
    g = {
        "unet.sample": torch.randn(3, 3, 8, 8, generator=gen),
        "unet.timesteps": torch.tensor([1000.0, 2000.0 / 3.0, 12.5]),
        "unet.context": torch.randn(3, 77, 8, generator=gen),
    }
    g["unet.out"] = unet(g["unet.sample"], g["unet.timesteps"], encoder_hidden_states=g["unet.context"]).sample
    save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(FOLDER, "goldens.safetensors"))
    print("written", FOLDER)


if __name__ == "__main__":
    main()
