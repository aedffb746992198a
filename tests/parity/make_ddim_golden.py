"""Goldens for the ε-prediction teachers: diffusers' DDIMScheduler (4 steps) and
DPMSolverMultistepScheduler (DPM-Solver++ 2M, 5 steps), SD 1.5 settings, driving the tiny
`conv-f32` parity UNet with guidance 1.5 on ε from fixed noise. Writes
tests/fixtures/parity/conv-f32/{ddim,dpm}.safetensors (noise, text, negative, latents, timesteps)."""

import os

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
folder = os.path.join(here, "..", "fixtures", "parity", "conv-f32")
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def golden(name, sched, steps, **step_kw):
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(11)
    s, d = unet.config.sample_size, unet.config.cross_attention_dim
    noise = torch.randn(2, 4, s, s, generator=gen)
    text = torch.randn(2, 77, d, generator=gen)
    negative = torch.randn(2, 77, d, generator=gen)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            e_text = unet(x, t, encoder_hidden_states=text).sample
            e_neg = unet(x, t, encoder_hidden_states=negative).sample
            eps = e_neg + 1.5 * (e_text - e_neg)
            x = sched.step(eps, t, x, **step_kw).prev_sample
    save_file({"noise": noise, "text": text, "negative": negative, "latents": x,
               "timesteps": sched.timesteps.to(torch.float32)},
              os.path.join(folder, f"{name}.safetensors"))
    print(name, "timesteps", sched.timesteps.tolist())


golden("ddim", DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sd15),
       4, eta=0.0)
golden("dpm", DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **sd15), 5)
