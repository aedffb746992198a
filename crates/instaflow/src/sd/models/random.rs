//! Diffusers folders in the SD-1.5 architecture with random weights: what tests and benchmarks
//! load when the published weights cannot be had (the browser's streaming loader at full size, the
//! CLI on the same folder). `sd15` has SD-1.5's exact shapes (UNet 859.5 M, CLIP-L text encoder
//! 123.1 M, VAE 83.7 M parameters); `mini` keeps every module type with narrow layers.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde_json::{Value, json};

use crate::sd::pipeline::init_components;
use crate::sd::source::ModelSource;
use crate::training::data::write_atomic;
use crate::training::model::save_safetensors;

/// Names of the presets.
pub const PRESETS: [&str; 2] = ["sd15", "mini"];

/// `(unet, vae, text_encoder)` configs of a preset, as diffusers/transformers write them.
pub fn preset_configs(name: &str) -> Result<(Value, Value, Value), String> {
    let (unet_blocks, heads, layers, vae_blocks, text, sample) = match name {
        "sd15" => (
            [320, 640, 1280, 1280],
            8,
            2,
            [128, 256, 512, 512],
            (768, 3072, 12, 12),
            64,
        ),
        "mini" => ([32, 64, 64, 64], 2, 1, [32, 32, 64, 64], (64, 128, 2, 4), 8),
        other => return Err(format!("unknown preset {other:?} (one of {PRESETS:?})")),
    };
    let (hidden, intermediate, text_layers, text_heads) = text;
    let unet = json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": unet_blocks,
        "cross_attention_dim": hidden,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "sample_size": sample,
    });
    let vae = json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": vae_blocks,
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": sample * 8,
        "scaling_factor": 0.18215,
    });
    let text_encoder = json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    });
    Ok((unet, vae, text_encoder))
}

/// How the weights of [`save_random_model`] are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// burn's default initialisers, from a seed: a model whose outputs are finite and vary.
    Random(u64),
    /// All zeros, written as a sparse file without computing anything: instant at any size, for
    /// loader and download tests where the values do not matter.
    Zeros,
}

/// Write a safetensors file of zeros with the tensors `layout`, leaving the data a hole.
fn save_zeros(layout: &[(String, Vec<usize>)], path: &Path, half: bool) -> Result<(), String> {
    let size = if half { 2 } else { 4 };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in layout {
        let name =
            crate::training::model::SAVE_REMAPS
                .iter()
                .fold(name.clone(), |n, (from, to)| {
                    regex::Regex::new(from)
                        .expect("valid pattern")
                        .replace(&n, *to)
                        .into_owned()
                });
        let bytes = size * shape.iter().product::<usize>();
        header.insert(
            name,
            json!({"dtype": if half { "F16" } else { "F32" }, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).expect("json");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = std::fs::File::create(path).map_err(io)?;
    use std::io::Write;
    f.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&json).map_err(io)?;
    f.set_len((8 + json.len() + offset) as u64).map_err(io)
}

/// Write preset `name` as a diffusers folder at `dir`, f16 when `half`; the tokenizer files come
/// from `tokenizer`.
pub fn save_random_model<B: Backend>(
    name: &str,
    dir: &Path,
    half: bool,
    init: Init,
    tokenizer: &ModelSource,
    device: &B::Device,
) -> Result<(), String> {
    let (unet, vae, text) = preset_configs(name)?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json");
    let index = json!({
        "_class_name": "RectifiedFlowPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    let mut files = vec![
        ("model_index.json".to_string(), pretty(&index)),
        ("unet/config.json".into(), pretty(&unet)),
        ("vae/config.json".into(), pretty(&vae)),
        ("text_encoder/config.json".into(), pretty(&text)),
    ];
    for f in ["vocab.json", "merges.txt"] {
        let rel = format!("tokenizer/{f}");
        files.push((
            rel.clone(),
            tokenizer.read(&rel).map_err(|e| e.to_string())?,
        ));
    }
    for (rel, bytes) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        write_atomic(&path, bytes).map_err(|e| e.to_string())?;
    }
    let source = ModelSource::dir(dir);
    let pipe = init_components::<B>(&source, device).map_err(|e| e.to_string())?;
    let seed = match init {
        Init::Random(seed) => seed,
        Init::Zeros => {
            use crate::sd::weights::stream::checkpoint_layout;
            let text = checkpoint_layout(&pipe.text_encoder);
            save_zeros(&text, &dir.join("text_encoder/model.safetensors"), half)?;
            let unet = checkpoint_layout(&pipe.unet);
            save_zeros(
                &unet,
                &dir.join("unet/diffusion_pytorch_model.safetensors"),
                half,
            )?;
            if let Some(vae) = &pipe.vae {
                let vae = checkpoint_layout(vae);
                save_zeros(
                    &vae,
                    &dir.join("vae/diffusion_pytorch_model.safetensors"),
                    half,
                )?;
            }
            return Ok(());
        }
    };
    B::seed(device, seed);
    save_safetensors(
        &pipe.text_encoder,
        &dir.join("text_encoder/model.safetensors"),
        half,
    )?;
    save_safetensors(
        &pipe.unet,
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        half,
    )?;
    if let Some(vae) = &pipe.vae {
        save_safetensors(
            vae,
            &dir.join("vae/diffusion_pytorch_model.safetensors"),
            half,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::models::lazy_param_count;
    use crate::sd::pipeline::InstaFlowPipeline;
    use crate::test_util::{TB, device};

    #[test]
    fn sd15_preset_has_sd15_parameter_counts() {
        let (unet, vae, text) = preset_configs("sd15").unwrap();
        let unet: crate::sd::models::UNet2DConditionConfig = serde_json::from_value(unet).unwrap();
        let vae: crate::sd::models::AutoencoderKLConfig = serde_json::from_value(vae).unwrap();
        let text: crate::sd::models::ClipTextConfig = serde_json::from_value(text).unwrap();
        assert_eq!(
            lazy_param_count(&unet.init::<TB>(&device()).unwrap()),
            859_520_964
        );
        assert_eq!(
            lazy_param_count(&vae.init::<TB>(&device()).unwrap()),
            83_653_863
        );
        assert_eq!(
            lazy_param_count(&text.init::<TB>(&device()).unwrap()),
            123_060_480
        );
        assert!(preset_configs("sd99").is_err());
    }

    #[test]
    fn a_saved_mini_model_loads_and_generates() {
        let dir = std::env::temp_dir().join(format!("instaflow-random-{}", std::process::id()));
        let tokenizer = crate::test_util::parity_folder("conv-f32", "random");
        save_random_model::<TB>("mini", &dir, true, Init::Random(3), &tokenizer, &device())
            .unwrap();
        let pipe = InstaFlowPipeline::<TB>::load(&ModelSource::dir(&dir), &device()).unwrap();
        assert_eq!(pipe.vae_scale, 8);
        let text = pipe.encode_prompts(&["a cat"], &device()).unwrap();
        let noise = crate::flow::noise::gaussian::<TB, 4>(
            &mut crate::flow::noise::rng(1),
            [1, 4, 8, 8],
            &device(),
        );
        let image = pipe.decode(pipe.sample(noise, &text, &text, Default::default()));
        assert_eq!(image.dims(), [1, 3, 64, 64]);
        let v = crate::test_util::to_vec(image);
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(
            v.iter().any(|x| *x != v[0]),
            "a random model makes a non-constant image"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_zeros_model_has_the_random_models_layout_and_loads() {
        let base = std::env::temp_dir().join(format!("instaflow-zeros-{}", std::process::id()));
        let tokenizer = crate::test_util::parity_folder("conv-f32", "zeros");
        let (a, b) = (base.join("random"), base.join("zeros"));
        save_random_model::<TB>("mini", &a, false, Init::Random(1), &tokenizer, &device()).unwrap();
        save_random_model::<TB>("mini", &b, false, Init::Zeros, &tokenizer, &device()).unwrap();
        for file in [
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ] {
            let layout = |d: &Path| {
                let h = crate::sd::weights::stream::read_header_from(&ModelSource::dir(d), file)
                    .unwrap();
                let mut v: Vec<_> = h.into_iter().map(|t| (t.name, t.shape, t.dtype)).collect();
                v.sort_by(|x, y| x.0.cmp(&y.0));
                v
            };
            assert_eq!(layout(&a), layout(&b), "{file}");
            // The sparse file is as long as its header says: every tensor's bytes are there.
            let h =
                crate::sd::weights::stream::read_header_from(&ModelSource::dir(&b), file).unwrap();
            let end = h.iter().map(|t| t.end).max().unwrap();
            assert_eq!(
                std::fs::metadata(b.join(file)).unwrap().len(),
                end,
                "{file}"
            );
        }
        let pipe = InstaFlowPipeline::<TB>::load(&ModelSource::dir(&b), &device()).unwrap();
        let text = pipe.encode_prompts(&["x"], &device()).unwrap();
        assert!(crate::test_util::to_vec(text).iter().all(|x| *x == 0.0));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
