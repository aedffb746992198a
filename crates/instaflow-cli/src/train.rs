//! `instaflow train` and `instaflow distill`: 1-RF from captioned images, k-RF on reflow pairs, and
//! one-step distillation — with progress, periodic checkpoints, `--resume` and model export.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use indicatif::ProgressStyle;
use instaflow::data::ImageTextDataset;
use instaflow::reflow::PairSet;
use instaflow::source::ModelSource;
use instaflow::tokenizer::ClipTokenizer;
use instaflow::train::{
    ModelSpec, Stage, TrainConfig, TrainData, Trainer, checkpoint_to_resume, load_model, save_model,
};

use crate::backend::{BackendChoice, resolve};
use crate::{embedded, plots, with_backend};

/// Options of `instaflow train` / `instaflow distill`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Caption–image data from `instaflow data` (trains 1-RF on independent noise/image draws).
    #[arg(long, conflicts_with = "pairs")]
    data: Option<PathBuf>,
    /// Reflow pairs from `instaflow reflow` (trains k-RF, or the one-step student for `distill`).
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Start from this model folder's weights (the teacher's, for reflow and distillation).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Architecture of a new model: tiny (tests), small, base.
    #[arg(long, default_value = "small")]
    size: String,
    /// Run folder: checkpoint/, model/ (EMA weights, diffusers layout), losses.csv, loss.png.
    #[arg(long)]
    out: PathBuf,
    /// Optimisation steps in total (a resumed run continues up to this count).
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak AdamW learning rate [default: 1e-3]. With --resume: the checkpoint's, unless given
    /// (e.g. a lower one after the loss diverged).
    #[arg(long)]
    lr: Option<f64>,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// EMA decay of the exported weights.
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Probability of the empty caption during flow training (enables guidance).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint (and export the model) every this many steps.
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// What a NaN/inf loss does: `stop` the run naming the step (the last checkpoint is kept), or
    /// `skip` the batch and go on (10 in a row still stop: the weights have diverged).
    #[arg(long, value_enum, default_value_t = OnNan::Stop)]
    on_nan: OnNan,
    /// Export the model in f16 (half the size; computed in f32 when loaded).
    #[arg(long)]
    half: bool,
}

fn check(args: &TrainArgs, stage: Stage) -> Result<()> {
    ensure!(
        args.steps > 0 && args.batch > 0,
        "--steps and --batch must be positive"
    );
    ensure!(
        args.lr.is_none_or(|lr| lr > 0.0 && lr.is_finite()),
        "--lr must be a positive number"
    );
    ensure!(
        (0.0..1.0).contains(&args.ema_decay),
        "--ema-decay must be in [0, 1)"
    );
    ensure!(
        (0.0..=1.0).contains(&args.caption_dropout),
        "--caption-dropout must be in [0, 1]"
    );
    ensure!(
        args.checkpoint_every > 0,
        "--checkpoint-every must be positive"
    );
    match (stage, &args.data, &args.pairs) {
        (Stage::Distill, _, None) => bail!("distill needs --pairs (from `instaflow reflow`)"),
        (Stage::Distill, _, _) if args.init.is_none() => {
            bail!("distill needs --init: the model the student starts from (the k-RF teacher)")
        }
        (_, None, None) => bail!("give --data (1-RF) or --pairs (reflow)"),
        _ => Ok(()),
    }
}

/// `--on-nan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnNan {
    /// Stop with an error naming the step.
    Stop,
    /// Drop the batch, count it, go on.
    Skip,
}

/// Run `instaflow train` (`stage` Flow/Reflow) or `instaflow distill`.
pub fn run(choice: BackendChoice, args: TrainArgs, distill: bool) -> Result<()> {
    let stage = match (distill, &args.pairs) {
        (true, _) => Stage::Distill,
        (false, Some(_)) => Stage::Reflow,
        (false, None) => Stage::Flow,
    };
    check(&args, stage)?;
    let ckpt = args.out.join("checkpoint");
    if !args.resume && checkpoint_to_resume(&ckpt).is_some() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            args.out.display()
        );
    }
    let data = match (&args.data, &args.pairs) {
        (Some(d), _) => TrainData::Images(ImageTextDataset::load(d)?),
        (_, Some(p)) => TrainData::Pairs(PairSet::load(p)?),
        _ => unreachable!("checked above"),
    };
    let selected = resolve(choice)?;
    crate::note!("backend: {}", selected.name());
    with_backend!(autodiff &selected, B, device => train::<B>(&args, stage, data, &device))
}

fn train<B: AutodiffBackend>(
    args: &TrainArgs,
    stage: Stage,
    data: TrainData,
    device: &B::Device,
) -> Result<()> {
    let (spec, model, tokenizer_source) = match &args.init {
        Some(dir) => {
            let source = ModelSource::dir(dir);
            let (spec, model) = load_model::<B>(&source, device)
                .with_context(|| format!("loading --init {}", dir.display()))?;
            (spec, model, source)
        }
        None => {
            let [c, h, _] = data.shape();
            let spec = ModelSpec::preset(&args.size, c, h).map_err(anyhow::Error::msg)?;
            // The initial weights follow --seed too, so a run is reproducible from its command.
            B::seed(device, args.seed);
            let model = spec.init::<B>(device).map_err(anyhow::Error::msg)?;
            (spec, model, embedded::tokenizer())
        }
    };
    let shape = spec.image_shape().map_err(anyhow::Error::msg)?;
    ensure!(
        shape == data.shape(),
        "the model makes {shape:?} samples but the training data is {:?}",
        data.shape()
    );
    let tokenizer = ClipTokenizer::from_source(&tokenizer_source, "tokenizer")?;
    let config = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr.unwrap_or(1e-3),
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        grad_clip: 1.0,
        ema_decay: args.ema_decay,
        caption_dropout: args.caption_dropout,
        seed: args.seed,
    };
    let mut trainer =
        Trainer::new(model, config, stage, tokenizer, device).map_err(anyhow::Error::msg)?;
    trainer.skip_non_finite = args.on_nan == OnNan::Skip;
    let ckpt = args.out.join("checkpoint");
    if args.resume {
        let Some(from) = checkpoint_to_resume(&ckpt) else {
            bail!("--resume: no checkpoint in {}", ckpt.display());
        };
        trainer.resume(&from)?;
        crate::note!("resumed at step {} from {}", trainer.step, from.display());
        if let Some(lr) = args.lr.filter(|&lr| lr != trainer.config.lr) {
            crate::note!(
                "learning rate {} → {lr} from step {}",
                trainer.config.lr,
                trainer.step
            );
            trainer.config.lr = lr;
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let bar = crate::progress_bar(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step as u64);
    bar.reset_eta();
    let start = Instant::now();
    let first = trainer.step;
    let export = |trainer: &Trainer<B>| -> Result<()> {
        trainer.save_checkpoint(&ckpt)?;
        save_model(
            &trainer.ema,
            &spec,
            &tokenizer_source,
            &args.out.join("model"),
            args.half,
        )
        .map_err(anyhow::Error::msg)?;
        write_losses(&trainer.losses, stage, &args.out)
    };
    crate::catch_interrupt();
    while trainer.step < args.steps {
        let loss = trainer.train_step(&data).map_err(anyhow::Error::msg)?;
        bar.set_position(trainer.step as u64);
        bar.set_message(format!("loss {loss:.4}"));
        if crate::interrupted() {
            export(&trainer)?;
            bar.finish_and_clear();
            return Err(crate::Interrupted(format!(
                "interrupted after step {}: checkpoint and model written to {}; run the same \
                 command with --resume to continue",
                trainer.step,
                args.out.display()
            ))
            .into());
        }
        if trainer.step % args.checkpoint_every == 0 && trainer.step < args.steps {
            export(&trainer)?;
        }
    }
    export(&trainer)?;
    bar.finish_and_clear();
    if !trainer.skipped.is_empty() {
        eprintln!(
            "warning: {} batch(es) dropped for a non-finite loss, at steps {:?}",
            trainer.skipped.len(),
            trainer.skipped
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let steps = trainer.step - first;
    let summary = serde_json::json!({
        "stage": format!("{stage:?}"),
        "config": trainer.config,
        "examples": data.len(),
        "steps_this_run": steps,
        "seconds_this_run": seconds,
        "samples_per_second": (steps * args.batch) as f64 / seconds.max(1e-9),
        "final_loss": trainer.losses.last().map(|l| l.1),
        "skipped_steps": trainer.skipped,
    });
    std::fs::write(
        args.out.join("train.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!(
        "{stage:?}: {steps} steps in {seconds:.1} s ({:.1} samples/s), final loss {:.4}; model → {}",
        (steps * args.batch) as f64 / seconds.max(1e-9),
        trainer.losses.last().map_or(f64::NAN, |l| l.1),
        args.out.join("model").display()
    );
    Ok(())
}

/// `losses.csv` and `loss.png` (a moving average, so the trend is visible).
fn write_losses(losses: &[(usize, f64)], stage: Stage, out: &Path) -> Result<()> {
    let mut csv = String::from("step,loss\n");
    for (s, l) in losses {
        csv += &format!("{s},{l}\n");
    }
    std::fs::write(out.join("losses.csv"), csv).context("writing losses.csv")?;
    let window = (losses.len() / 50).max(1);
    let smooth: Vec<(usize, f64)> = losses
        .chunks(window)
        .map(|c| (c[0].0, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64))
        .collect();
    plots::loss_curves(
        &[(format!("{stage:?} (mean of {window})"), smooth)],
        &out.join("loss.png"),
    )
}
