//! Numerical parity with diffusers/transformers: tiny random models in diffusers layout and their
//! golden outputs are made by `tests/parity/make_goldens.py` (PyTorch) and committed; these tests
//! load the same folders and compare (fp32: ≤ 1e-4 per component, ≤ 1e-3 on pipeline latents).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use instaflow::sd::models::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig};
use instaflow::sd::pipeline::{
    GenerateOptions, InstaFlowPipeline, load_text_encoder, load_unet, load_vae,
};
use instaflow::sd::source::ModelSource;
use safetensors::{Dtype, SafeTensors};

type B = Flex;
const CONFIGS: [&str; 3] = ["conv-f32", "linear-f16", "small-bf16"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

/// A pipeline folder: the fixture plus the shared tokenizer, assembled in a temp dir.
fn pipeline_dir(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "instaflow-parity-{name}-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for part in ["unet", "vae", "text_encoder"] {
        let to = dir.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(fixture(name).join(part)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(assets.join(f), tok.join(f)).unwrap();
    }
    dir
}

struct Goldens(Vec<u8>);

impl Goldens {
    fn load(name: &str) -> Self {
        Self(std::fs::read(fixture(name).join("goldens.safetensors")).unwrap())
    }

    fn raw(&self, key: &str) -> (Vec<usize>, Vec<u8>, Dtype) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("golden {key}"));
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    fn f32<const D: usize>(&self, key: &str) -> Tensor<B, D> {
        let (shape, bytes, dtype) = self.raw(key);
        assert_eq!(dtype, Dtype::F32);
        let v: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn ids(&self, key: &str) -> Tensor<B, 2, Int> {
        let (shape, bytes, dtype) = self.raw(key);
        assert_eq!(dtype, Dtype::I64);
        let v: Vec<i64> = bytes
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }
}

/// Largest |a − b|; NaN when any value is NaN (a tensor `max` may skip NaN).
fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d: Vec<f32> = (a - b).abs().into_data().to_vec().unwrap();
    d.iter().fold(0.0, |m: f32, &x| {
        if x.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

fn check(config: &str, what: &str, err: f32, tol: f32) {
    println!("{config:12} {what:28} max |Δ| = {err:.2e}");
    assert!(
        err <= tol,
        "{config}: {what} differs from diffusers by {err} (tolerance {tol})"
    );
}

#[test]
fn text_encoder_matches_transformers() {
    for name in CONFIGS {
        let g = Goldens::load(name);
        let model = load_text_encoder::<B>(
            &ModelSource::dir(fixture(name)),
            "text_encoder",
            &Default::default(),
        )
        .unwrap();
        let out = model.forward(g.ids("text.ids"));
        check(
            name,
            "text hidden states",
            max_abs_diff(out, g.f32::<3>("text.hidden")),
            1e-4,
        );
    }
}

#[test]
fn unet_matches_diffusers_at_integer_and_fractional_timesteps() {
    for name in CONFIGS {
        let g = Goldens::load(name);
        let (_, unet) = load_unet::<B>(
            &ModelSource::dir(fixture(name)),
            "unet",
            &Default::default(),
        )
        .unwrap();
        let out = unet.forward(
            g.f32("unet.sample"),
            g.f32("unet.timesteps"),
            &g.f32("unet.context"),
        );
        check(
            name,
            "UNet (τ = 1000, 666.7, 12.5)",
            max_abs_diff(out, g.f32::<4>("unet.out")),
            1e-4,
        );
    }
}

#[test]
fn unet_with_the_prompt_pooled_into_the_time_embedding_matches_diffusers() {
    // addition_embed_type "text": AttentionPooling + TextTimeEmbedding added to the time embedding.
    let g = Goldens::load("text-time");
    let (_, unet) = load_unet::<B>(
        &ModelSource::dir(fixture("text-time")),
        "unet",
        &Default::default(),
    )
    .unwrap();
    let out = unet.forward(
        g.f32("unet.sample"),
        g.f32("unet.timesteps"),
        &g.f32("unet.context"),
    );
    check(
        "text-time",
        "UNet with a text addition embedding",
        max_abs_diff(out, g.f32::<4>("unet.out")),
        1e-4,
    );
}

#[test]
fn vae_matches_diffusers() {
    for name in CONFIGS {
        let g = Goldens::load(name);
        let (_, vae) =
            load_vae::<B>(&ModelSource::dir(fixture(name)), "vae", &Default::default()).unwrap();
        let (mean, logvar) = vae.encode(g.f32("vae.image"));
        check(
            name,
            "VAE encode mean",
            max_abs_diff(mean, g.f32::<4>("vae.mean")),
            1e-4,
        );
        check(
            name,
            "VAE encode logvar",
            max_abs_diff(logvar, g.f32::<4>("vae.logvar")),
            1e-4,
        );
        let decoded = vae.decode(g.f32("vae.latents"));
        check(
            name,
            "VAE decode",
            max_abs_diff(decoded, g.f32::<4>("vae.decoded")),
            1e-4,
        );
    }
}

#[test]
fn pipeline_matches_the_reference_loop() {
    let device = Default::default();
    for name in CONFIGS {
        let g = Goldens::load(name);
        let dir = pipeline_dir(name, "folder");
        let pipe = InstaFlowPipeline::<B>::load(&ModelSource::dir(&dir), &device).unwrap();
        let text = pipe.encode_prompts(&["red heart"], &device).unwrap();
        let neg = pipe.encode_prompts(&[""], &device).unwrap();
        for (steps, guidance) in [(1usize, 1.0f64), (4, 1.5)] {
            let latents = pipe.sample(
                g.f32("pipeline.noise"),
                &text,
                &neg,
                GenerateOptions { steps, guidance },
            );
            let key = format!("pipeline.n{steps}");
            check(
                name,
                &format!("{key} latents"),
                max_abs_diff(latents.clone(), g.f32::<4>(&format!("{key}.latents"))),
                1e-3,
            );
            let pixels = pipe.decode(latents);
            check(
                name,
                &format!("{key} pixels"),
                max_abs_diff(pixels, g.f32::<4>(&format!("{key}.pixels"))),
                1e-3,
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sd15_parameter_counts_from_configs_without_allocating() {
    let device = Default::default();
    assert_eq!(
        UNet2DConditionConfig::sd15()
            .num_params::<B>(&device)
            .unwrap(),
        859_520_964
    );
    let vae = AutoencoderKLConfig::sd15().init::<B>(&device).unwrap();
    assert_eq!(instaflow::sd::models::lazy_param_count(&vae), 83_653_863);
    assert_eq!(
        ClipTextConfig::sd15().num_params::<B>(&device).unwrap(),
        123_060_480
    );
}

#[test]
fn sharded_weights_load_like_a_single_file() {
    let name = "conv-f32";
    let src = fixture(name).join("unet");
    let root = std::env::temp_dir().join(format!("instaflow-sharded-{}", std::process::id()));
    let dir = root.join("unet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(part.to_vec(), None).unwrap(),
        )
        .unwrap();
        for (n, _) in part.iter() {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let g = Goldens::load(name);
    let (_, unet) = load_unet::<B>(&ModelSource::dir(&root), "unet", &Default::default()).unwrap();
    let out = unet.forward(
        g.f32("unet.sample"),
        g.f32("unet.timesteps"),
        &g.f32("unet.context"),
    );
    check(
        name,
        "UNet from two shards",
        max_abs_diff(out, g.f32::<4>("unet.out")),
        1e-4,
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_model_in_memory_loads_like_the_folder() {
    let name = "small-bf16";
    let dir = pipeline_dir(name, "memory");
    let mut files = std::collections::BTreeMap::new();
    for part in ["unet", "vae", "text_encoder", "tokenizer"] {
        for entry in std::fs::read_dir(dir.join(part)).unwrap() {
            let entry = entry.unwrap();
            files.insert(
                format!("{part}/{}", entry.file_name().to_string_lossy()),
                std::fs::read(entry.path()).unwrap(),
            );
        }
    }
    let source = ModelSource::Memory {
        name: "in-memory model".into(),
        files,
    };
    let device = Default::default();
    let pipe = InstaFlowPipeline::<B>::load(&source, &device).unwrap();
    let g = Goldens::load(name);
    let text = pipe.encode_prompts(&["red heart"], &device).unwrap();
    let latents = pipe.sample(
        g.f32("pipeline.noise"),
        &text,
        &text,
        GenerateOptions::default(),
    );
    check(
        name,
        "in-memory pipeline n1",
        max_abs_diff(latents, g.f32::<4>("pipeline.n1.latents")),
        1e-3,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vae_with_pre_0_14_attention_names_loads() {
    // Older SD-1.x VAE files name the mid-block attention `query`/`key`/`value`/`proj_attn`.
    let name = "conv-f32";
    let root = std::env::temp_dir().join(format!("instaflow-old-vae-{}", std::process::id()));
    let dir = root.join("vae");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture(name).join("vae");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let n = n
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (n, t)
        })
        .collect();
    assert!(renamed.iter().any(|(n, _)| n.contains(".proj_attn.")));
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors"),
        safetensors::serialize(renamed, None).unwrap(),
    )
    .unwrap();
    let g = Goldens::load(name);
    let (_, vae) = load_vae::<B>(&ModelSource::dir(&root), "vae", &Default::default()).unwrap();
    check(
        name,
        "VAE decode (old names)",
        max_abs_diff(vae.decode(g.f32("vae.latents")), g.f32::<4>("vae.decoded")),
        1e-4,
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The DDIM teacher (for ε-prediction SD models) against diffusers' `DDIMScheduler`, 4 steps,
/// guidance 1.5 (golden from `tests/parity/make_ddim_golden.py`).
#[test]
fn ddim_teacher_matches_diffusers_scheduler() {
    let name = "conv-f32";
    let g = Goldens(std::fs::read(fixture(name).join("ddim.safetensors")).unwrap());
    let (_, unet) = load_unet::<B>(
        &ModelSource::dir(fixture(name)),
        "unet",
        &Default::default(),
    )
    .unwrap();
    let cfg = instaflow::sd::ddim::SchedulerConfig::default();
    let out = instaflow::sd::ddim::ddim_sample(
        &unet,
        g.f32("noise"),
        &g.f32("text"),
        &g.f32("negative"),
        1.5,
        4,
        &cfg,
    );
    check(
        name,
        "DDIM 4 steps, α = 1.5",
        max_abs_diff(out, g.f32("latents")),
        1e-4,
    );
}

/// The DPM-Solver++ (2M) teacher against diffusers' `DPMSolverMultistepScheduler`
/// (`dpmsolver++`, order 2), 5 steps (first-order start, second-order middle, σ = 0 end),
/// guidance 1.5 (golden from `tests/parity/make_ddim_golden.py`).
#[test]
fn dpm_solver_teacher_matches_diffusers_scheduler() {
    let name = "conv-f32";
    let g = Goldens(std::fs::read(fixture(name).join("dpm.safetensors")).unwrap());
    let (_, unet) = load_unet::<B>(
        &ModelSource::dir(fixture(name)),
        "unet",
        &Default::default(),
    )
    .unwrap();
    let cfg = instaflow::sd::ddim::SchedulerConfig::default();
    let taus: Vec<f32> = instaflow::sd::dpm_solver::timesteps(&cfg, 5)
        .into_iter()
        .map(|t| t as f32)
        .collect();
    assert_eq!(
        taus,
        g.f32::<1>("timesteps").into_data().to_vec::<f32>().unwrap()
    );
    let out = instaflow::sd::dpm_solver::dpm_solver_sample(
        &unet,
        g.f32("noise"),
        &g.f32("text"),
        &g.f32("negative"),
        1.5,
        5,
        &cfg,
    );
    check(
        name,
        "DPM-Solver++ 2M 5 steps, α = 1.5",
        max_abs_diff(out, g.f32("latents")),
        1e-4,
    );
}
