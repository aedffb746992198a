//! `instaflow bench`: text encoder, UNet and VAE decoder at SD-1.5 size with random weights.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Args;
use instaflow::bench::time_runs;
use instaflow::sd::models::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig};

use crate::backend::{BackendChoice, resolve};
use crate::with_backend;

/// Options of `instaflow bench`.
#[derive(Debug, Args)]
pub struct BenchSdArgs {
    /// Latent size (64 = 512×512 images, SD-1.5's native size).
    #[arg(long, default_value_t = 64)]
    latent: usize,
    /// Timed runs of each model after one warm-up run (the median is reported).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Peak resident memory of this process in MiB, if known.
fn peak_rss_mib() -> Option<f64> {
    crate::memory::peak_rss().map(|b| b as f64 / (1024.0 * 1024.0))
}

/// (first run, median) in seconds.
fn median_s<B: Backend, const D: usize>(
    repeats: usize,
    f: impl FnMut() -> Tensor<B, D>,
) -> (f64, f64) {
    let t = time_runs(repeats, f);
    (t.first_ms / 1e3, t.median_ms / 1e3)
}

/// Run `instaflow bench`.
pub fn run(choice: BackendChoice, args: BenchSdArgs) -> Result<()> {
    ensure!(
        args.latent >= 8 && args.latent.is_multiple_of(8),
        "--latent must be a positive multiple of 8"
    );
    let selected = resolve(choice)?;
    let result = with_backend!(&selected, B, device => bench::<B>(&args, &device));
    let json = serde_json::json!({
        "backend": selected.name(),
        "latent": args.latent,
        "image": args.latent * 8,
        "text_encode_s": result[0],
        "unet_s": result[1],
        "vae_decode_s": result[2],
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn bench<B: Backend>(args: &BenchSdArgs, device: &B::Device) -> [f64; 3] {
    let normal = Distribution::Normal(0.0, 1.0);
    let l = args.latent;
    crate::note!("building SD-1.5 text encoder, UNet and VAE with random weights …");
    let text = ClipTextConfig::sd15()
        .init::<B>(device)
        .expect("SD-1.5 config");
    let unet = UNet2DConditionConfig::sd15()
        .init::<B>(device)
        .expect("SD-1.5 config");
    let vae = AutoencoderKLConfig::sd15()
        .init::<B>(device)
        .expect("SD-1.5 config");

    let ids = Tensor::<B, 2, Int>::from_ints([[49406i32, 320, 1929, 2038, 49407]], device)
        .pad((0, 72, 0, 0), 49407);
    let (first, text_s) = median_s(args.repeats, || text.forward(ids.clone()));
    crate::note!("text encoder: {text_s:.3} s (first run incl. weight init {first:.2} s)");

    let context = Tensor::<B, 3>::random([1, 77, 768], normal, device);
    let sample = Tensor::<B, 4>::random([1, 4, l, l], normal, device);
    let tau = Tensor::<B, 1>::from_floats([1000.0], device);
    let (first, unet_s) = median_s(args.repeats, || {
        unet.forward(sample.clone(), tau.clone(), &context)
    });
    crate::note!("UNet {l}×{l}: {unet_s:.2} s (first run incl. weight init {first:.2} s)");

    let latents = Tensor::<B, 4>::random([1, 4, l, l], normal, device);
    let (first, vae_s) = median_s(args.repeats, || vae.decode(latents.clone()));
    crate::note!(
        "VAE decode {l}→{}: {vae_s:.2} s (first run incl. weight init {first:.2} s)",
        8 * l
    );
    [text_s, unet_s, vae_s]
}
