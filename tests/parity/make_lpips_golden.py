"""LPIPS golden for `training::lpips` (parity with PyPI `lpips` 0.1.4).

No pretrained VGG16 can be had offline, and a random one is 59 MB, so the backbone's weights are
a formula both sides can compute (`formula` below; the Rust test writes the same values into a
safetensors file with torchvision's key names). The linear heads are the lpips package's own
`weights/v0.1/vgg.pth`, copied to tests/fixtures/lpips/ and read by both. Images are a formula
too; the golden holds only the distances.

    python tests/parity/make_lpips_golden.py   # writes tests/fixtures/lpips/golden.json
"""
import json, os, shutil

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import lpips

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "lpips")


def formula(j, shape, bias):
    """Parameter j (in torchvision's order) of the given shape."""
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.float64)
    if bias:
        v = 0.01 * np.cos(0.3 * i + j)
    else:
        fan_in = shape[1] * shape[2] * shape[3]
        v = np.sin(0.7 * i + 1.3 * j + 0.1) * np.sqrt(2.0 / fan_in)
    return v.astype(np.float32).reshape(shape)


def images(phase):
    b, c, h, w = 2, 3, 64, 64
    i = np.arange(b * c * h * w, dtype=np.float64).reshape(b, c, h, w)
    return (0.9 * np.sin(0.013 * i * (1 + phase) + phase)).astype(np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    shutil.copy(heads, os.path.join(OUT, "vgg.pth"))
    features = torchvision.models.vgg16(weights=None).features
    state = {}
    for j, (name, p) in enumerate(features.state_dict().items()):
        state[name] = torch.from_numpy(formula(j, tuple(p.shape), name.endswith("bias")))
    features.load_state_dict(state)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, model_path=heads, verbose=False)
    for k in range(1, 6):
        part = getattr(model.net, f"slice{k}")
        for idx, module in part.named_children():
            module.load_state_dict(features[int(idx)].state_dict())
    model.eval()
    a, b = torch.from_numpy(images(0.0)), torch.from_numpy(images(0.5))
    with torch.no_grad():
        full = model(a, b).flatten().tolist()
        small = model(
            F.interpolate(a, size=(48, 48), mode="bilinear", align_corners=False),
            F.interpolate(b, size=(48, 48), mode="bilinear", align_corners=False),
        ).flatten().tolist()
        same = model(a, a).flatten().tolist()
    golden = {"lpips_64": full, "lpips_resized_48": small, "lpips_same": same,
              "torch": torch.__version__, "lpips": "0.1.4"}
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print(golden)


if __name__ == "__main__":
    main()
