//! `instaflow generate`: text to image with an InstaFlow (or any SD-1.5-structured rectified-flow)
//! diffusers folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use clap::Args;
use instaflow::sd::pipeline::{
    GenerateOptions, Generated, GenerationStage, InitialNoise, StageHook, Timings, to_rgb8,
};
use safetensors::Dtype;

use crate::backend::{BackendChoice, Precision, Selected, device_memory, resolve, set_precision};
use crate::{embedded, with_backend};
use instaflow::training::data::write_atomic;

/// Options of `instaflow generate`.
#[derive(Debug, Args)]
#[command(after_long_help = embedded::prompts_help())]
pub struct GenerateArgs {
    /// The text prompt (longer prompts are cut to CLIP's 75 tokens, with a warning).
    prompt: String,
    /// A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/), e.g. a local
    /// copy of XCLiu/instaflow_0_9B_from_sd_1_5 or `RUN/model` from `instaflow distill`. Without
    /// it, the built-in one-step shapes model (32×32 pixels; its prompts are listed below) is used.
    /// A Hugging Face id (`hf:XCLiu/instaflow_0_9B_from_sd_1_5`, `@REVISION` optional) is read
    /// from the hub's local cache (HF_HUB_CACHE / HF_HOME / ~/.cache/huggingface/hub, shared with
    /// Python's huggingface_hub); files missing there are downloaded from HF_ENDPOINT (default
    /// https://huggingface.co, HF_TOKEN for gated models) unless HF_HUB_OFFLINE=1.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Euler steps N (InstaFlow one-step models: 1; 2-rectified-flow models: 10–25).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Guidance α of the paper: v = α·v(text) + (1 − α)·v(negative). 1 is plain conditional (one
    /// UNet call per step). diffusers' `guidance_scale` ≤ 1 means α = 1.
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Prompt of the negative/null branch of guidance (used only when α ≠ 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0, conflicts_with = "noise")]
    seed: u64,
    /// Initial latents: a safetensors file with one f32 tensor [B, 4, h, w] (sets size and batch).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Image width in pixels (default: the UNet's sample_size × 8).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (default: the UNet's sample_size × 8).
    #[arg(long)]
    height: Option<usize>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Output PNG (with --batch > 1: out-0.png, out-1.png, …).
    #[arg(long, default_value = "instaflow.png")]
    out: PathBuf,
    /// Enlarge the PNG by this integer factor (nearest neighbour). Default: 1, or 8 for the
    /// built-in 32×32 model (a 256×256 PNG).
    #[arg(long)]
    scale: Option<u32>,
    /// Also write the final latents (before decoding) as an f32 tensor named `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Float type of the computation: f32, or f16 on a GPU (`--backend wgpu` on an adapter with
    /// `shader-f16`, or `cuda`) for half the device memory. Weights are converted when loaded.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Refuse requests estimated to need more memory than this (e.g. `8G`, `512MiB`): weights,
    /// activations and noise. Default: the available RAM (for the host's share; a GPU's own
    /// memory is only checked against this when it is given).
    #[arg(long, value_parser = crate::memory::parse_size)]
    max_memory: Option<u64>,
    /// After the image, generate it this many times more with the model loaded and report the
    /// median of those runs (`timings_ms.warm` with --json): the time per call of a loaded model
    /// (all --batch images together), without the first run's one-time costs.
    #[arg(long, default_value_t = 0)]
    repeats: usize,
}

/// Most Euler steps one run takes (2-RF models use 10–25; InstaFlow 1).
const MAX_STEPS: usize = 10_000;

/// Largest PNG side written (an enlarged image is held in memory before it is encoded).
const MAX_PNG_SIDE: u64 = 16_384;

/// `out.png` → `out-3.png` when there are several images.
fn indexed(path: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{i}"),
    };
    path.with_file_name(name)
}

/// The initial latents from `--noise`: one finite f32 tensor of rank 4.
fn read_noise(path: &Path, channels: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).with_context(|| format!("--noise {}", path.display()))?;
    instaflow::flow::noise::from_safetensors(&bytes, channels)
        .map_err(|e| anyhow::anyhow!("--noise {}: {e}", path.display()))
}

/// Run `instaflow generate`.
pub fn run(choice: BackendChoice, args: GenerateArgs) -> Result<()> {
    ensure!(
        !args.prompt.trim().is_empty(),
        "the prompt is empty (give a text, e.g. \"red heart\")"
    );
    ensure!(
        (1..=MAX_STEPS).contains(&args.steps),
        "--steps {}: must be between 1 and {MAX_STEPS}",
        args.steps
    );
    ensure!(
        args.guidance.is_finite(),
        "--guidance must be a finite number"
    );
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(
        args.out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png")),
        "--out {}: the output must be a .png file",
        args.out.display()
    );
    let model = args
        .model
        .as_deref()
        .map(|m| crate::hub::model_folder(m, !crate::quiet()))
        .transpose()?;
    ensure!(
        args.scale.is_none_or(|s| (1..=64).contains(&s)),
        "--scale must be between 1 and 64"
    );
    let selected = resolve(choice)?;
    set_precision(&selected, args.precision)?;
    with_backend!(&selected, B, device => generate::<B>(&args, model.as_deref(), &device, &selected))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The largest device memory pool seen at the end of each stage (reserved, in use), in bytes.
#[derive(Default)]
struct PeakMemory(Option<(u64, u64)>);

impl PeakMemory {
    fn sample(&mut self, selected: &Selected) {
        if let Some((reserved, used)) = device_memory(selected) {
            let (r, u) = self.0.unwrap_or_default();
            self.0 = Some((r.max(reserved), u.max(used)));
        }
    }
}

/// Reports each stage of a generation as it finishes (and samples the device memory).
struct Report<'a> {
    memory: &'a mut PeakMemory,
    selected: &'a Selected,
}

impl<B: Backend> StageHook<B> for Report<'_> {
    async fn settle(&mut self, probe: Tensor<B, 1>) -> Result<(), String> {
        probe.into_data();
        Ok(())
    }

    fn finished(&mut self, stage: GenerationStage, ms: f64) {
        self.memory.sample(self.selected);
        match stage {
            GenerationStage::TextEncoded => crate::note!("text encoded in {ms:.0} ms"),
            GenerationStage::Step { index, of, evals } => crate::note!(
                "UNet step {}/{of} ({evals} evaluation(s)) in {ms:.0} ms",
                index + 1
            ),
            GenerationStage::Decoded => crate::note!("decoded in {ms:.0} ms"),
        }
    }
}

/// Waits for each stage and reports nothing (the warm runs of `--repeats`).
struct Settle;

impl<B: Backend> StageHook<B> for Settle {
    async fn settle(&mut self, probe: Tensor<B, 1>) -> Result<(), String> {
        probe.into_data();
        Ok(())
    }
}

/// Median of the stage timings of `runs` (text encoding, all UNet steps, decoding, their sum).
fn median_timings(runs: &[Timings]) -> serde_json::Value {
    let median = |f: &dyn Fn(&Timings) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    serde_json::json!({
        "runs": runs.len(),
        "text_encode": median(&|t| t.encode_ms),
        "unet": median(&Timings::unet_ms),
        "decode": median(&|t| t.decode_ms),
        "total": median(&|t| t.encode_ms + t.unet_ms() + t.decode_ms),
    })
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn generate<B: Backend>(
    args: &GenerateArgs,
    model: Option<&Path>,
    device: &B::Device,
    selected: &Selected,
) -> Result<()> {
    let backend = selected.name();
    let mut memory = PeakMemory::default();
    let total = Instant::now();
    let t = Instant::now();
    let (source, model_name) = match model {
        Some(m) => (
            instaflow::sd::source::ModelSource::dir(m),
            args.model.as_deref().unwrap_or(m).display().to_string(),
        ),
        None => (embedded::default_model(), embedded::NAME.to_string()),
    };
    // Configs first (nothing allocated): the request is checked against memory before the
    // weights are read.
    let mut pipe = instaflow::sd::pipeline::init_components::<B>(&source, device)
        .with_context(|| format!("loading {model_name}"))?;
    let channels = pipe.unet_config.in_channels;
    let multiple = pipe.vae_scale << (pipe.unet_config.block_out_channels.len() - 1);
    let given_noise = match &args.noise {
        Some(path) => {
            let (shape, values) = read_noise(path, channels)?;
            ensure!(
                args.batch == 1 || args.batch == shape[0],
                "--batch {} disagrees with the {} latents in --noise",
                args.batch,
                shape[0]
            );
            Some((shape, values))
        }
        None => None,
    };
    let noise_shape = match &given_noise {
        Some((shape, _)) => shape.clone(),
        None => pipe
            .latent_shape(args.batch, args.width, args.height)
            .map_err(|e| anyhow::anyhow!("--{e}"))?
            .to_vec(),
    };
    let [b, _, h, w] = [
        noise_shape[0],
        noise_shape[1],
        noise_shape[2],
        noise_shape[3],
    ];
    ensure!(
        h * pipe.vae_scale % multiple == 0 && w * pipe.vae_scale % multiple == 0,
        "latents {h}×{w}: the size must be a multiple of {} for this model",
        multiple / pipe.vae_scale
    );
    let float_bytes = match args.precision {
        Precision::F16 => 2,
        Precision::F32 => 4,
    };
    let estimate = pipe.memory_estimate([b, channels, h, w], float_bytes);
    let request = format!(
        "--width {} --height {} --batch {b}",
        w.saturating_mul(pipe.vae_scale),
        h.saturating_mul(pipe.vae_scale)
    );
    crate::memory::check(
        &request,
        &estimate,
        selected,
        args.max_memory,
        float_bytes == 2,
    )?;
    let scale = args
        .scale
        .unwrap_or(if args.model.is_none() { 8 } else { 1 });
    let side = (w.max(h) as u64).saturating_mul((pipe.vae_scale as u64) * scale as u64);
    ensure!(
        side <= MAX_PNG_SIDE,
        "--scale {scale}: the PNG would be {side} pixels a side; at most {MAX_PNG_SIDE}"
    );

    pipe.load_weights(&source, device)
        .with_context(|| format!("loading {model_name}"))?;
    B::sync(device).map_err(|e| anyhow::anyhow!("loading {model_name}: {e:?}"))?;
    let load_ms = ms(t);
    memory.sample(selected);
    let weights_bytes = memory.0.map(|(_, used)| used);
    crate::note!("loaded {model_name} in {:.1} s", load_ms / 1e3);
    let noise = match given_noise {
        Some((_, values)) => InitialNoise::Values(values),
        None => InitialNoise::Seed(args.seed),
    };
    let noise_shape = [b, channels, h, w];
    let z0 = pipe
        .initial_noise(noise_shape, noise, device)
        .map_err(anyhow::Error::msg)?;
    if pipe.tokenizer.is_truncated(&args.prompt)? {
        eprintln!("warning: the prompt is longer than CLIP's 75 tokens; the rest is ignored");
    }
    let opts = GenerateOptions {
        steps: args.steps,
        guidance: args.guidance,
    };
    let mut hook = Report {
        memory: &mut memory,
        selected,
    };
    let generated = futures_lite::future::block_on(pipe.generate(
        &args.prompt,
        &args.negative_prompt,
        z0.clone(),
        opts,
        &mut hook,
    ))
    .map_err(anyhow::Error::msg)?;
    let warm = (args.repeats > 0)
        .then(|| -> Result<serde_json::Value> {
            let mut runs = Vec::with_capacity(args.repeats);
            for _ in 0..args.repeats {
                let again = futures_lite::future::block_on(pipe.generate(
                    &args.prompt,
                    &args.negative_prompt,
                    z0.clone(),
                    opts,
                    &mut Settle,
                ))
                .map_err(anyhow::Error::msg)?;
                runs.push(again.timings);
            }
            let warm = median_timings(&runs);
            crate::note!(
                "warm, median of {} runs: text {:.1} ms, UNet {:.1} ms, decode {:.1} ms, {:.1} ms in all",
                args.repeats,
                warm["text_encode"].as_f64().unwrap_or_default(),
                warm["unet"].as_f64().unwrap_or_default(),
                warm["decode"].as_f64().unwrap_or_default(),
                warm["total"].as_f64().unwrap_or_default()
            );
            Ok(warm)
        })
        .transpose()?;
    let Generated {
        latents: z,
        pixels,
        timings,
    } = generated;
    let images = to_rgb8(pixels);
    if let (Some((reserved, used)), Some(weights)) = (memory.0, weights_bytes) {
        crate::note!(
            "device memory ({:?}): weights {:.2} GB, peak in use {:.2} GB, pool reserved {:.2} GB",
            args.precision,
            gb(weights),
            gb(used),
            gb(reserved)
        );
    }

    let (hh, ww) = (h * pipe.vae_scale, w * pipe.vae_scale);
    let mut outputs = Vec::new();
    let mut latents_out = Vec::new();
    for (i, rgb) in images.into_iter().enumerate() {
        let path = indexed(&args.out, i, b);
        let (rgb, ww, hh) = if scale > 1 {
            let img =
                image::RgbImage::from_raw(ww as u32, hh as u32, rgb).context("image buffer")?;
            let big = image::imageops::resize(
                &img,
                ww as u32 * scale,
                hh as u32 * scale,
                image::imageops::FilterType::Nearest,
            );
            (big.into_raw(), ww * scale as usize, hh * scale as usize)
        } else {
            (rgb, ww, hh)
        };
        let mut png = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            &rgb,
            ww as u32,
            hh as u32,
            image::ColorType::Rgb8,
        )
        .context("encoding PNG")?;
        write_atomic(&path, &png)?;
        outputs.push(path.display().to_string());
        if let Some(lat) = &args.save_latents {
            let path = indexed(lat, i, b);
            let one: Vec<f32> = z
                .clone()
                .slice([i..i + 1, 0..channels, 0..h, 0..w])
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let bytes: Vec<u8> = one.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view =
                safetensors::tensor::TensorView::new(Dtype::F32, vec![1, channels, h, w], &bytes)?;
            write_atomic(&path, &safetensors::serialize([("latents", view)], None)?)?;
            latents_out.push(path.display().to_string());
        }
    }
    let total_ms = ms(total);
    if args.json {
        let summary = serde_json::json!({
            "prompt": args.prompt, "negative_prompt": args.negative_prompt, "model": model_name,
            "backend": backend, "precision": format!("{:?}", args.precision).to_lowercase(), "steps": opts.steps, "guidance": opts.guidance,
            "seed": if args.noise.is_some() { None } else { Some(args.seed) },
            "width": ww * scale as usize, "height": hh * scale as usize, "batch": b, "outputs": outputs, "latents": latents_out,
            "timings_ms": { "load": load_ms, "text_encode": timings.encode_ms, "unet_steps": timings.step_ms, "decode": timings.decode_ms, "total": total_ms, "warm": warm },
            "device_memory_bytes": memory.0.map(|(reserved, used)| serde_json::json!({
                "weights": weights_bytes, "peak_in_use": used, "peak_reserved": reserved,
            })),
        });
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        for o in &outputs {
            println!("{o}");
        }
    }
    Ok(())
}
