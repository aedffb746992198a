import torch, json
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file, load_file
pipe = StableDiffusionPipeline.from_pretrained("2rf/model", safety_checker=None, requires_safety_checker=False)
print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.unet.config.sample_size, pipe.vae.config.scaling_factor)
g = torch.Generator().manual_seed(0)
s = pipe.unet.config.sample_size
noise = torch.randn(1, 4, s, s, generator=g)
save_file({"noise": noise.contiguous()}, "noise.safetensors")
ids = pipe.tokenizer(["a red heart"], padding="max_length", max_length=77, return_tensors="pt").input_ids
with torch.no_grad():
    text = pipe.text_encoder(ids)[0]
    z = noise.clone()
    n = 2
    for i in range(n):
        t = torch.tensor([(1.0 - i / n) * 1000.0])
        v = pipe.unet(z, t, encoder_hidden_states=text).sample
        z = z + v / n
save_file({"latents": z.contiguous()}, "torch-latents.safetensors")
