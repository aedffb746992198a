//! LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
//! 2018) as a frozen distillation loss: InstaFlow's second distillation stage, and half of
//! 2-rectified flow++'s LPIPS-Huber loss.
//!
//! The network is burn-train's (`burn_train::metric::vision::Lpips`, VGG16 backbone); its own
//! `init_pretrained` downloads the weights at run time, which this tool never does, so they are
//! read here from local files: torchvision's VGG16 (`vgg16-397923af.pth`, keys `features.N.*`)
//! and the lpips package's linear heads (`weights/v0.1/vgg.pth`, keys `linK.model.1.weight`),
//! either as PyTorch pickles or as safetensors with the same keys. Every parameter must be
//! found with its shape; nothing is skipped with a warning.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn_store::{ModuleSnapshot, PytorchStore, SafetensorsStore};
pub use burn_train::metric::vision::{Lpips, LpipsConfig, LpipsNet};

/// Where torchvision's VGG16 layers sit in burn-train's VGG feature extractor.
const VGG_FEATURES: [(usize, &str); 13] = [
    (0, "conv1_1"),
    (2, "conv1_2"),
    (5, "conv2_1"),
    (7, "conv2_2"),
    (10, "conv3_1"),
    (12, "conv3_2"),
    (14, "conv3_3"),
    (17, "conv4_1"),
    (19, "conv4_2"),
    (21, "conv4_3"),
    (24, "conv5_1"),
    (26, "conv5_2"),
    (28, "conv5_3"),
];

/// File names looked for in an LPIPS weights folder, first match wins.
pub const BACKBONE_FILES: [&str; 3] = ["vgg16-397923af.pth", "vgg16.pth", "vgg16.safetensors"];
/// The linear heads' file names.
pub const HEAD_FILES: [&str; 2] = ["vgg.pth", "vgg.safetensors"];

/// Why LPIPS weights could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LpipsError {
    /// The folder lacks one of the two files.
    #[error(
        "{dir}: no {what} weights (expected one of {expected}); LPIPS needs torchvision's VGG16 \
         and the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)"
    )]
    Missing {
        /// The folder searched.
        dir: String,
        /// "VGG16 backbone" or "linear-head".
        what: &'static str,
        /// The names tried.
        expected: String,
    },
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// What the reader said.
        message: String,
    },
    /// Parameters that no file provided.
    #[error("LPIPS weights lack {count} tensor(s), e.g. `{first}` (from {files})")]
    Incomplete {
        /// How many.
        count: usize,
        /// The first, as a module path.
        first: String,
        /// The files read.
        files: String,
    },
    /// A tensor whose shape differs from the network's.
    #[error("{path}: LPIPS tensor {message}")]
    Mismatch {
        /// The file.
        path: String,
        /// The tensor and both shapes.
        message: String,
    },
}

/// The two files of a VGG LPIPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpipsWeights {
    /// torchvision VGG16 (`features.N.weight` / `.bias`).
    pub backbone: PathBuf,
    /// lpips' linear heads (`linK.model.1.weight`).
    pub heads: PathBuf,
}

impl LpipsWeights {
    /// The files in `dir` ([`BACKBONE_FILES`], [`HEAD_FILES`]).
    pub fn in_dir(dir: &Path) -> Result<Self, LpipsError> {
        let find = |names: &[&str], what: &'static str| {
            names
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| LpipsError::Missing {
                    dir: dir.display().to_string(),
                    what,
                    expected: names.join(", "),
                })
        };
        Ok(Self {
            backbone: find(&BACKBONE_FILES, "VGG16 backbone")?,
            heads: find(&HEAD_FILES, "linear-head")?,
        })
    }

    /// A frozen VGG LPIPS for images in [−1, 1], with these weights.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Lpips<B>, LpipsError> {
        let mut lpips = LpipsConfig::new()
            .with_net(LpipsNet::Vgg)
            .with_normalize(false)
            .init::<B>(device);
        let backbone: Vec<(String, String)> = VGG_FEATURES
            .iter()
            .map(|(i, name)| (format!(r"^features\.{i}\."), format!("extractor.{name}.")))
            .collect();
        let heads: Vec<(String, String)> = (0..5)
            .map(|k| (format!(r"^lin{k}\.model\.1\."), format!("lin{k}.")))
            .collect();
        let mut applied = Vec::new();
        for (path, remaps) in [(&self.backbone, backbone), (&self.heads, heads)] {
            applied.extend(apply(&mut lpips, path, &remaps)?);
        }
        let missing: Vec<String> = lpips
            .collect(None, None, true)
            .iter()
            .map(|s| s.full_path())
            .filter(|name| !applied.contains(name))
            .collect();
        if let Some(first) = missing.first() {
            return Err(LpipsError::Incomplete {
                count: missing.len(),
                first: first.clone(),
                files: format!("{} and {}", self.backbone.display(), self.heads.display()),
            });
        }
        Ok(lpips.no_grad())
    }
}

/// Load what `path` has of the network (after `remaps`); returns the module paths filled.
fn apply<B: Backend>(
    lpips: &mut Lpips<B>,
    path: &Path,
    remaps: &[(String, String)],
) -> Result<Vec<String>, LpipsError> {
    let shown = path.display().to_string();
    let unreadable = |message: String| LpipsError::Unreadable {
        path: shown.clone(),
        message,
    };
    let safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let result = if safetensors {
        let store = SafetensorsStore::from_file(path)
            .allow_partial(true)
            .skip_enum_variants(true);
        let mut store = remaps
            .iter()
            .fold(store, |s, (from, to)| s.with_key_remapping(from, to));
        lpips.load_from(&mut store).map_err(|e| e.to_string())
    } else {
        let store = PytorchStore::from_file(path).allow_partial(true);
        let mut store = remaps
            .iter()
            .fold(store, |s, (from, to)| s.with_key_remapping(from, to));
        lpips.load_from(&mut store).map_err(|e| e.to_string())
    }
    .map_err(unreadable)?;
    if let Some(e) = result.errors.first() {
        return Err(LpipsError::Mismatch {
            path: shown,
            message: format!("{e}"),
        });
    }
    Ok(result.applied)
}

/// LPIPS distance per sample between images in [−1, 1] (`[B, C, H, W]`; one channel is
/// repeated to three), optionally resized to `size`² first (bilinear), as the loss sees them.
pub fn distance<B: Backend>(
    lpips: &Lpips<B>,
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    size: Option<usize>,
) -> Tensor<B, 1> {
    let prepare = |x: Tensor<B, 4>| {
        let x = match x.dims()[1] {
            1 => x.repeat_dim(1, 3),
            _ => x,
        };
        match size {
            Some(s) if x.dims()[2] != s || x.dims()[3] != s => {
                // torch's `F.interpolate(…, mode="bilinear")`: half-pixel centres.
                let mut options = InterpolateOptions::new(InterpolateMode::Bilinear);
                options.align_corners = false;
                burn::tensor::module::interpolate(x, [s, s], options)
            }
            _ => x,
        }
    };
    lpips.forward_no_reduction(prepare(a), prepare(b))
}

/// The perceptual side of a distillation loss: LPIPS, and for latent-space models the frozen VAE
/// that decodes both the student's one step and the teacher's result before comparing them
/// (gradients flow through the decoder to the student, never into the VAE).
#[derive(Debug)]
pub struct Perceptual<B: Backend> {
    /// The frozen LPIPS network.
    pub lpips: Lpips<B>,
    /// The frozen VAE of a latent-space model (none in pixel space).
    pub vae: Option<crate::sd::models::AutoencoderKL<B>>,
    /// Resize decoded images to this square size first (e.g. 224, LPIPS' training size).
    pub size: Option<usize>,
}

impl<B: Backend> Perceptual<B> {
    /// `lpips` and (for latent models) `vae`, both frozen.
    pub fn new(
        lpips: Lpips<B>,
        vae: Option<crate::sd::models::AutoencoderKL<B>>,
        size: Option<usize>,
    ) -> Self {
        Self {
            lpips: lpips.no_grad(),
            vae: vae.map(Module::no_grad),
            size,
        }
    }

    /// LPIPS per sample between two batches of the model's samples (latents or pixels).
    pub fn distance(&self, prediction: Tensor<B, 4>, target: Tensor<B, 4>) -> Tensor<B, 1> {
        let decode = |x: Tensor<B, 4>| match &self.vae {
            Some(vae) => vae.decode(x / vae.scaling_factor()),
            None => x,
        };
        distance(&self.lpips, decode(prediction), decode(target), self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TB, device, to_vec};
    use burn::tensor::TensorData;

    /// The formula of `tests/parity/make_lpips_golden.py` for parameter `j` (torchvision order).
    fn formula(j: usize, shape: &[usize], bias: bool) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| {
                let i = i as f64;
                let v = if bias {
                    0.01 * (0.3 * i + j as f64).cos()
                } else {
                    let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
                    (0.7 * i + 1.3 * j as f64 + 0.1).sin() * (2.0 / fan_in).sqrt()
                };
                v as f32
            })
            .collect()
    }

    /// torchvision's VGG16 `features` with the formula's weights, as safetensors in `dir`.
    pub(crate) fn write_formula_backbone(path: &Path) {
        let widths = [
            64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
        ];
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut input = 3;
        for (k, (&(index, _), &out)) in VGG_FEATURES.iter().zip(&widths).enumerate() {
            for (bias, shape) in [(false, vec![out, input, 3, 3]), (true, vec![out])] {
                let values = formula(2 * k + bias as usize, &shape, bias);
                let name = format!("features.{index}.{}", if bias { "bias" } else { "weight" });
                tensors.push((name, shape, bytemuck::cast_slice(&values).to_vec()));
            }
            input = out;
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                (n.clone(), view.unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn images(phase: f64) -> Tensor<TB, 4> {
        let n = 2 * 3 * 64 * 64;
        let v: Vec<f32> = (0..n)
            .map(|i| (0.9 * (0.013 * i as f64 * (1.0 + phase) + phase).sin()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(v, [2, 3, 64, 64]), &device())
    }

    fn fixture(dir: &Path) -> LpipsWeights {
        std::fs::create_dir_all(dir).unwrap();
        write_formula_backbone(&dir.join("vgg16.safetensors"));
        let heads =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lpips/vgg.pth");
        std::fs::copy(heads, dir.join("vgg.pth")).unwrap();
        LpipsWeights::in_dir(dir).unwrap()
    }

    #[test]
    fn lpips_matches_the_lpips_package() {
        let dir = std::env::temp_dir().join(format!("instaflow-lpips-{}", std::process::id()));
        let lpips = fixture(&dir).load::<TB>(&device()).unwrap();
        let golden: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/lpips/golden.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let expected = |key: &str| -> Vec<f32> {
            golden[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        };
        for (key, size) in [("lpips_64", None), ("lpips_resized_48", Some(48))] {
            let got = to_vec(distance(&lpips, images(0.0), images(0.5), size));
            let want = expected(key);
            let err = crate::test_util::max_abs_diff(&got, &want);
            assert!(err <= 1e-4, "{key}: {got:?} vs lpips {want:?}");
        }
        let same = to_vec(distance(&lpips, images(0.0), images(0.0), None));
        assert!(same.iter().all(|d| d.abs() < 1e-6), "{same:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_misshaped_lpips_weights_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("instaflow-lpips-bad-{}", std::process::id()));
        let weights = fixture(&dir);
        std::fs::remove_file(&weights.heads).unwrap();
        let err = LpipsWeights::in_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("linear-head") && err.contains("vgg.pth"),
            "{err}"
        );
        // Heads from another file: the backbone alone leaves the heads unfilled.
        let only_backbone = LpipsWeights {
            heads: weights.backbone.clone(),
            ..weights.clone()
        };
        let err = only_backbone.load::<TB>(&device()).unwrap_err().to_string();
        assert!(err.contains("lin0.weight"), "{err}");
        // A backbone whose first layer has the wrong shape names it.
        let views = [(
            "features.0.weight".to_string(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![64, 3, 1, 1],
                &[0u8; 64 * 3 * 4],
            )
            .unwrap(),
        )];
        let bad = dir.join("bad.safetensors");
        safetensors::serialize_to_file(views, None, &bad).unwrap();
        let bad_backbone = LpipsWeights {
            backbone: bad,
            ..weights
        };
        let err = bad_backbone.load::<TB>(&device()).unwrap_err().to_string();
        assert!(err.contains("conv1_1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
