//! `instaflow train` and `instaflow distill`: 1-RF from captioned images, k-RF on reflow pairs, and
//! one-step distillation — with progress, periodic checkpoints, `--resume` and model export.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, ValueEnum};
use indicatif::ProgressStyle;
use instaflow::sd::pipeline::{load_vae, read_config};
use instaflow::sd::source::ModelSource;
use instaflow::sd::tokenizer::ClipTokenizer;
use instaflow::training::data::ImageTextDataset;
use instaflow::training::data_parallel::{CpuShare, Nodes, Replica, port_of, spawn_orchestrator};
use instaflow::training::latents::EncodedImages;
use instaflow::training::lpips::{LpipsWeights, Perceptual};
use instaflow::training::memory_plan::{self, TrainMemoryPlan};
use instaflow::training::precision::Precision;
use instaflow::training::reflow::PairSet;
use instaflow::training::{
    DistillLoss, Export, ModelSpec, Stage, TextToImage, TrainConfig, TrainData, Trainer,
    checkpoint_to_resume, load_model, save_model,
};

#[cfg(feature = "cuda")]
use crate::backend::cuda_devices;
use crate::backend::{BackendChoice, DeviceList, resolve, wgpu_devices};
use crate::memory::{OutOfMemory, available_ram, human};
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
    /// Start from this model's weights (the teacher's, for reflow and distillation): a diffusers
    /// folder or a Hugging Face id (`hf:ORG/NAME[@REV]`). A folder with a `vae/` (Stable
    /// Diffusion, InstaFlow, or a run of this tool on one) trains in its latent space: the UNet
    /// only (see --train-text-encoder), the VAE frozen and exported with the model; --data images
    /// are encoded by that VAE once. The UNet starts from the folder's weights even when they
    /// predict ε (SD): reflow turns it into a velocity model, as InstaFlow did.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Train the text encoder too (with --init of a latent-space model, it is frozen otherwise,
    /// as in InstaFlow; models from scratch or pixel-space --init always train it).
    #[arg(long)]
    train_text_encoder: bool,
    /// Sum the gradients of this many micro-batches of --batch before each update: one step
    /// sees --batch × K examples (× workers), drawn as one batch that large would be, in the
    /// memory of --batch.
    #[arg(long, default_value_t = 1, value_name = "K")]
    grad_accum: usize,
    /// Distillation loss between the student's one step and the teacher's result: `l2`
    /// (InstaFlow's first stage), `lpips` (its second stage: on images, decoded by the frozen
    /// VAE for latent models, gradients through the decoder), `lpips-huber` (2-rectified
    /// flow++: pseudo-Huber on the samples + LPIPS). The stages chain: `distill --loss l2 …`,
    /// then `distill --init STAGE1/model --loss lpips …` continues the student.
    #[arg(long, value_enum, default_value_t = LossArg::L2)]
    loss: LossArg,
    /// LPIPS weights for --loss lpips|lpips-huber: a folder with torchvision's VGG16
    /// (`vgg16-397923af.pth`, or `vgg16.safetensors`) and the lpips package's linear heads
    /// (`vgg.pth` from lpips/weights/v0.1/, or `vgg.safetensors`); or `hf:ORG/NAME` of a Hub
    /// repository holding them at its top level (read from the hub's cache, fetched if missing).
    #[arg(long, value_name = "DIR|hf:ID")]
    lpips: Option<PathBuf>,
    /// Resize the decoded images to SIZE×SIZE before LPIPS (e.g. 224, the size LPIPS was
    /// trained at; smaller is cheaper).
    #[arg(long, value_name = "SIZE")]
    loss_size: Option<usize>,
    /// Gradient checkpointing: the backward pass recomputes the outputs of cheap, memory-bound
    /// operations (normalisations, activations, softmax, additions) instead of keeping them
    /// from the forward pass (burn's `BalancedCheckpointing`). Less activation memory for some
    /// more compute; the same gradients.
    #[arg(long)]
    checkpointing: bool,
    /// Print the memory plan per device (weights, gradients, AdamW state, EMA, frozen parts,
    /// activations; the batch per 24/40/80 GB device) and exit without training.
    #[arg(long)]
    plan: bool,
    /// Refuse runs whose plan needs more than this per device (e.g. `80G`, `24GiB`). Default on
    /// the CPU: the available RAM; GPUs are only checked when it is given.
    #[arg(long, value_parser = crate::memory::parse_size, value_name = "SIZE")]
    max_memory: Option<u64>,
    /// Architecture of a new model: tiny (tests), small, base.
    #[arg(long, default_value = "small")]
    size: String,
    /// A new model also adds the pooled prompt to the time embedding (diffusers'
    /// `addition_embed_type: "text"`), so every ResNet block sees the prompt, not only the
    /// cross-attention layers: prompts are followed much sooner in training from scratch.
    #[arg(long, conflicts_with = "init")]
    pooled_text: bool,
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
    /// EMA decay of the exported weights; 0 keeps no EMA (exports the trained weights and saves
    /// the memory of one copy of them — at SD-1.5 size 3.4 GB).
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
    /// Float type of the forward and backward passes; the weights and the optimizer stay f32.
    /// `f16`: with dynamic loss scaling (steps whose gradients overflow are skipped and the scale
    /// halved); wgpu needs an adapter with `shader-f16`. `bf16`: no scaling needed; CUDA or CPU.
    /// Halves activation memory on GPUs; the CPU backend supports both but computes them slower
    /// than f32. May change on --resume.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Train data-parallel on several devices: `cpu:N` (N workers sharing the CPU),
    /// `cuda:0,1,…` or `wgpu:0,1,…` (one worker per device; wgpu numbers as `instaflow
    /// backends` lists). Each worker computes an equal share of every --batch (which must split
    /// evenly) and gradients are averaged before each update, so the run takes the same steps as
    /// one device with the same --batch. Chooses the backend (--backend must agree or be auto).
    #[arg(long, value_name = "DEVICES")]
    devices: Option<String>,
    /// Train on this many machines at once, each running this command with its own --node-rank
    /// (and the same data, --batch, --seed and --devices count). Gradients are averaged over every
    /// device of every machine.
    #[arg(long, default_value_t = 1, value_name = "N")]
    nodes: u32,
    /// This machine's index among --nodes, from 0. Machine 0 runs the coordinator and is the only
    /// one that writes checkpoints and the model (--resume on the others needs them too: a shared
    /// folder, or a copy).
    #[arg(long, default_value_t = 0, value_name = "R")]
    node_rank: u32,
    /// HOST:PORT of the coordinator; machine 0 listens on PORT (on all interfaces).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// HOST:PORT at which the other machines reach this one; PORT is opened here for tensors.
    #[arg(long, value_name = "HOST:PORT")]
    node_address: Option<String>,
    /// With --nodes: seconds to wait for every machine to join, and for a step to finish, before
    /// stopping with an error (a machine that died or cannot be reached). The last checkpoint is
    /// kept.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    peer_timeout: u64,
}

/// Most machines `--nodes` accepts.
const MAX_NODES: u32 = 4096;

impl TrainArgs {
    /// The machines of a run, checked.
    fn nodes(&self) -> Result<Option<Nodes>> {
        ensure!(
            (1..=MAX_NODES).contains(&self.nodes),
            "--nodes must be between 1 and {MAX_NODES}"
        );
        ensure!(
            self.node_rank < self.nodes,
            "--node-rank {} is out of range: --nodes {} means ranks 0 to {}",
            self.node_rank,
            self.nodes,
            self.nodes - 1
        );
        ensure!(self.peer_timeout > 0, "--peer-timeout must be positive");
        if self.nodes == 1 {
            return Ok(None);
        }
        let (Some(coordinator), Some(address)) = (&self.coordinator, &self.node_address) else {
            bail!(
                "--nodes {} needs --coordinator HOST:PORT and --node-address HOST:PORT",
                self.nodes
            );
        };
        for (flag, value) in [("--coordinator", coordinator), ("--node-address", address)] {
            port_of(value).map_err(|e| anyhow::anyhow!("{flag} {e}"))?;
        }
        Ok(Some(Nodes {
            count: self.nodes,
            coordinator: coordinator.clone(),
            address: address.clone(),
        }))
    }
}

fn check(args: &TrainArgs, stage: Stage) -> Result<()> {
    ensure!(
        args.steps > 0 && args.batch > 0 && args.grad_accum > 0,
        "--steps, --batch and --grad-accum must be positive"
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
    let loss = DistillLoss::from(args.loss);
    ensure!(
        stage == Stage::Distill || loss == DistillLoss::L2,
        "--loss is a distillation setting: use it with `instaflow distill`"
    );
    ensure!(
        args.lpips.is_none() || loss.perceptual(),
        "--lpips is only read by --loss lpips or lpips-huber"
    );
    ensure!(
        args.loss_size.is_none_or(|s| s >= 16),
        "--loss-size must be at least 16 (LPIPS' VGG halves the image four times)"
    );
    if loss.perceptual() && args.lpips.is_none() {
        bail!(
            "--loss {} needs LPIPS weights: --lpips DIR (torchvision's vgg16-397923af.pth and the \
             lpips package's vgg.pth) or --lpips hf:ORG/NAME of a Hub repository holding them",
            args.loss
                .to_possible_value()
                .map_or("lpips".into(), |v| v.get_name().to_string())
        );
    }
    match (stage, &args.data, &args.pairs) {
        (Stage::Distill, _, None) => bail!("distill needs --pairs (from `instaflow reflow`)"),
        (Stage::Distill, _, _) if args.init.is_none() => {
            bail!("distill needs --init: the model the student starts from (the k-RF teacher)")
        }
        (_, None, None) => bail!("give --data (1-RF) or --pairs (reflow)"),
        _ => Ok(()),
    }
}

/// `--precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrecisionArg {
    /// Everything in f32.
    F32,
    /// Passes in f16, loss scaling.
    F16,
    /// Passes in bf16.
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F16 => Precision::F16,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// `--loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LossArg {
    /// Mean squared error.
    L2,
    /// LPIPS on images.
    Lpips,
    /// Pseudo-Huber + LPIPS.
    LpipsHuber,
}

impl From<LossArg> for DistillLoss {
    fn from(l: LossArg) -> Self {
        match l {
            LossArg::L2 => DistillLoss::L2,
            LossArg::Lpips => DistillLoss::Lpips,
            LossArg::LpipsHuber => DistillLoss::LpipsHuber,
        }
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
    if let Some(spec) = &args.devices {
        let list = DeviceList::parse(spec)?;
        let name = |c: BackendChoice| c.to_possible_value().map(|v| v.get_name().to_string());
        ensure!(
            choice == BackendChoice::Auto || choice == list.backend(),
            "--backend {} and --devices {spec} disagree; give one of them",
            name(choice).unwrap_or_default()
        );
        crate::note!("data parallel: {} workers ({spec})", list.len());
        return match args.checkpointing {
            true => on_devices::<BalancedCheckpointing>(list, &args, stage, data),
            false => on_devices::<NoCheckpointing>(list, &args, stage, data),
        };
    }
    let selected = resolve(choice)?;
    crate::note!("backend: {}", selected.name());
    match args.checkpointing {
        true => with_backend!(autodiff<BalancedCheckpointing> &selected, B, device => {
            train::<B>(&args, stage, data, vec![device])
        }),
        false => with_backend!(autodiff &selected, B, device => {
            train::<B>(&args, stage, data, vec![device])
        }),
    }
}

/// Train data-parallel on the devices of `list`, with the checkpoint strategy `C`.
fn on_devices<C: CheckpointStrategy>(
    list: DeviceList,
    args: &TrainArgs,
    stage: Stage,
    data: TrainData,
) -> Result<()> {
    match list {
        DeviceList::Cpu(n) => {
            train::<Autodiff<Flex, C>>(args, stage, data, vec![Default::default(); n])
        }
        DeviceList::Wgpu(ids) => train::<Autodiff<Wgpu, C>>(args, stage, data, wgpu_devices(&ids)?),
        #[cfg(feature = "cuda")]
        DeviceList::Cuda(ids) => {
            train::<Autodiff<burn::backend::Cuda, C>>(args, stage, data, cuda_devices(&ids)?)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceList::Cuda(_) => bail!(
            "--devices cuda:…: this binary was built without the `cuda` feature: rebuild it with \
             `cargo build --release -p instaflow-cli --features cuda`"
        ),
    }
}

/// Train on `devices`, one worker each. The first worker runs on this thread and reports, writes
/// checkpoints and exports the model; the others compute their shares of each batch.
fn train<B: AutodiffBackend>(
    args: &TrainArgs,
    stage: Stage,
    data: TrainData,
    devices: Vec<B::Device>,
) -> Result<()> {
    let device = &devices[0];
    let nodes = args.nodes()?;
    // Machine 0's first worker reports and writes; every other worker only computes.
    let writer = args.node_rank == 0;
    let local = devices.len();
    let workers = local * args.nodes as usize;
    let group = |i: usize| {
        (workers > 1).then(|| Replica {
            rank: args.node_rank as usize * local + i,
            count: workers,
            local,
            nodes: nodes.clone(),
        })
    };
    if let Some(r) = group(0) {
        r.check_batch(args.batch).map_err(anyhow::Error::msg)?;
    }
    let precision = Precision::from(args.precision);
    for d in &devices {
        precision.check::<B>(d).map_err(anyhow::Error::msg)?;
    }
    let (spec, model, tokenizer_source) = match &args.init {
        Some(init) => {
            let dir = crate::hub::model_folder(init, true)?;
            let source = ModelSource::dir(&dir);
            let (spec, model) = load_model::<B>(&source, device)
                .with_context(|| format!("loading --init {}", init.display()))?;
            (spec, model, source)
        }
        None => {
            let [c, h, _] = data.shape();
            let mut spec = ModelSpec::preset(&args.size, c, h).map_err(anyhow::Error::msg)?;
            if args.pooled_text {
                spec = spec.with_pooled_text();
            }
            // The initial weights follow --seed too, so a run is reproducible from its command.
            B::seed(device, args.seed);
            let model = spec.init::<B>(device).map_err(anyhow::Error::msg)?;
            (spec, model, embedded::tokenizer())
        }
    };
    // A model with a VAE trains in its latent space, the VAE frozen.
    let latent = tokenizer_source.has_dir("vae");
    let data = match (latent, data) {
        (true, TrainData::Images(images)) => {
            TrainData::Latents(encode_images::<B>(&images, &tokenizer_source, device)?)
        }
        (_, data) => data,
    };
    check_shapes(&spec, &data, latent, args.init.as_deref())?;
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
        precision,
        grad_accum: args.grad_accum,
        train_text_encoder: !latent || args.train_text_encoder,
        loss: args.loss.into(),
        checkpointing: args.checkpointing,
    };
    let lpips = match &args.lpips {
        Some(spec) => Some(LpipsWeights::in_dir(&crate::hub::lpips_folder(spec)?)?),
        None => None,
    };
    let (loss_size, vae_source) = (args.loss_size, tokenizer_source.clone());
    let perceptual_vae = match (&lpips, latent) {
        (Some(_), true) => Some(read_config(&tokenizer_source, "vae")?),
        _ => None,
    };
    let plan = memory_plan::plan(
        &spec,
        data.shape(),
        args.batch / workers,
        &config,
        perceptual_vae.as_ref(),
    )
    .map_err(anyhow::Error::msg)?;
    if args.plan {
        print_plan(&plan, args.batch, args.grad_accum, workers);
        return Ok(());
    }
    check_plan(&plan, args.max_memory, is_cpu::<B>())?;
    let ckpt = args.out.join("checkpoint");
    let resume_from = match args.resume {
        true => match checkpoint_to_resume(&ckpt) {
            Some(from) => Some(from),
            None => bail!("--resume: no checkpoint in {}", ckpt.display()),
        },
        false => None,
    };
    // Every worker builds the same trainer: the same weights, the same checkpoint resumed, the
    // same --lr override; the first one says so.
    let (on_nan_skip, lr) = (args.on_nan == OnNan::Skip, args.lr);
    let make =
        move |model: TextToImage<B>, device: &B::Device, first: bool| -> Result<Trainer<B>> {
            let mut trainer = Trainer::new(model, config.clone(), stage, tokenizer.clone(), device)
                .map_err(anyhow::Error::msg)?;
            trainer.skip_non_finite = on_nan_skip;
            if let Some(weights) = &lpips {
                let network = weights.load::<B>(device)?;
                let vae = match latent {
                    true => Some(
                        load_vae::<B>(&vae_source, "vae", device)
                            .context("loading the VAE that decodes for LPIPS")?
                            .1,
                    ),
                    false => None,
                };
                trainer.set_perceptual(Perceptual::new(network, vae, loss_size));
            }
            if let Some(from) = &resume_from {
                trainer.resume(from)?;
                if first {
                    crate::note!("resumed at step {} from {}", trainer.step, from.display());
                    if let Some(lr) = lr.filter(|&lr| lr != trainer.config.lr) {
                        crate::note!(
                            "learning rate {} → {lr} from step {}",
                            trainer.config.lr,
                            trainer.step
                        );
                    }
                }
            }
            if let Some(lr) = lr {
                trainer.config.lr = lr;
            }
            Ok(trainer)
        };
    let mut trainer = make(model.clone(), device, true)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    crate::catch_interrupt();

    // The other workers, each on its own thread. A worker that fails ends the process: the rest
    // of the group would otherwise wait for it forever (checkpoints are replaced atomically).
    let data = Arc::new(data);
    let (reports, reported) = mpsc::channel::<WorkerReport>();
    if let Some(n) = nodes.as_ref().filter(|_| writer) {
        let port = port_of(&n.coordinator).map_err(anyhow::Error::msg)?;
        spawn_orchestrator(port).map_err(anyhow::Error::msg)?;
    }
    let watchdog = nodes.as_ref().map(|_| Watchdog::start(args.peer_timeout));
    for (i, worker_device) in devices.iter().enumerate().skip(1) {
        let (make, model, data, reports) =
            (make.clone(), model.clone(), data.clone(), reports.clone());
        let (worker_device, steps) = (worker_device.clone(), args.steps);
        let replica = group(i).expect("several workers");
        let rank = replica.rank;
        std::thread::spawn(move || {
            let run = || -> Result<WorkerReport> {
                let mut trainer = make(model.fork(&worker_device), &worker_device, false)?;
                replica
                    .join::<B>(&worker_device)
                    .map_err(anyhow::Error::msg)?;
                trainer
                    .join_group(replica.clone())
                    .map_err(anyhow::Error::msg)?;
                let (start, first) = (Instant::now(), trainer.step);
                let share = CpuShare::of(local);
                while trainer.step < steps {
                    share
                        .run(|| trainer.train_step(&data))
                        .map_err(anyhow::Error::msg)?;
                    if trainer
                        .anyone(crate::interrupted())
                        .map_err(anyhow::Error::msg)?
                    {
                        break;
                    }
                }
                replica.leave::<B>().map_err(anyhow::Error::msg)?;
                Ok(WorkerReport::of(
                    &trainer,
                    rank,
                    &worker_device,
                    first,
                    start,
                ))
            };
            match run() {
                Ok(report) => drop(reports.send(report)),
                Err(e) => {
                    eprintln!("error: training worker {rank} ({worker_device:?}) failed: {e:#}");
                    crate::memory::exit_now(1);
                }
            }
        });
    }
    drop(reports);
    // The loaded weights stay alive only in the trainers: at SD-1.5 size a third copy of the
    // UNet (the file's pages) would otherwise outlive the first update.
    drop(model);
    if let Some(replica) = group(0) {
        replica.join::<B>(device).map_err(anyhow::Error::msg)?;
        trainer
            .join_group(replica.clone())
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(w) = &watchdog {
        w.progress(Phase::Training);
    }

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
        if !writer {
            return Ok(());
        }
        trainer.save_checkpoint(&ckpt)?;
        let export = Export {
            base: &tokenizer_source,
            half: args.half,
            text_encoder_frozen: !trainer.config.train_text_encoder,
        };
        save_model(&trainer.exported(), &spec, &args.out.join("model"), export)
            .map_err(anyhow::Error::msg)?;
        write_losses(&trainer.losses, stage, &args.out)
    };
    let share = CpuShare::of(local);
    while trainer.step < args.steps {
        let loss = share
            .run(|| trainer.train_step(&data))
            .map_err(anyhow::Error::msg)?;
        if let Some(w) = &watchdog {
            w.progress(Phase::Training);
        }
        bar.set_position(trainer.step as u64);
        let share = trainer.all_reduce_seconds / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(match workers {
            1 => format!("loss {loss:.4}"),
            _ => format!("loss {loss:.4} · all-reduce {:.0}%", 100.0 * share),
        });
        // Every worker stops after the same step when any of them was interrupted.
        if trainer
            .anyone(crate::interrupted())
            .map_err(anyhow::Error::msg)?
        {
            export(&trainer)?;
            bar.finish_and_clear();
            let written = match writer {
                true => format!("checkpoint and model written to {}", args.out.display()),
                false => "machine 0 writes the checkpoint".into(),
            };
            return Err(crate::Interrupted(format!(
                "interrupted after step {}: {written}; run the same command with --resume to \
                 continue",
                trainer.step,
            ))
            .into());
        }
        if trainer.step % args.checkpoint_every == 0 && trainer.step < args.steps {
            export(&trainer)?;
        }
    }
    // The peak of the steps themselves, before the last export adds its buffers.
    let training_peak = crate::memory::peak_rss();
    export(&trainer)?;
    bar.finish_and_clear();
    let rank0 = group(0).map_or(0, |r| r.rank);
    let mut per_worker = vec![WorkerReport::of(&trainer, rank0, device, first, start)];
    if let Some(replica) = group(0) {
        replica.leave::<B>().map_err(anyhow::Error::msg)?;
        per_worker.extend(reported.iter());
        per_worker.sort_by_key(|r| r.rank);
    }
    if !trainer.overflowed.is_empty() {
        crate::note!(
            "f16: {} step(s) skipped for overflowing gradients (normal while the loss scale \
             settles); loss scale now {}",
            trainer.overflowed.len(),
            trainer.loss_scaler.scale
        );
    }
    if !trainer.skipped.is_empty() {
        eprintln!(
            "warning: {} batch(es) dropped for a non-finite loss, at steps {:?}",
            trainer.skipped.len(),
            trainer.skipped
        );
    }
    if let Some(w) = &watchdog {
        w.stop();
    }
    let seconds = start.elapsed().as_secs_f64();
    let steps = trainer.step - first;
    if !writer {
        println!(
            "{stage:?}: machine {} took part in {steps} steps in {seconds:.1} s; machine 0 wrote \
             the model",
            args.node_rank
        );
        return Ok(());
    }
    let summary = serde_json::json!({
        "stage": format!("{stage:?}"),
        "config": trainer.config,
        "examples": data.len(),
        "steps_this_run": steps,
        "seconds_this_run": seconds,
        "samples_per_second": (steps * args.batch * args.grad_accum) as f64 / seconds.max(1e-9),
        "final_loss": trainer.losses.last().map(|l| l.1),
        "peak_rss_bytes_training": training_peak,
        "peak_rss_bytes": crate::memory::peak_rss(),
        "memory_plan": plan,
        "skipped_steps": trainer.skipped,
        "precision": precision.name(),
        "loss_scale": (precision == Precision::F16).then_some(trainer.loss_scaler.scale),
        "overflowed_steps": trainer.overflowed,
        "workers": per_worker.iter().map(|w| w.json(args.batch / workers)).collect::<Vec<_>>(),
    });
    std::fs::write(
        args.out.join("train.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!(
        "{stage:?}: {steps} steps in {seconds:.1} s ({:.1} samples/s{}{}), final loss {:.4}; model → {}",
        (steps * args.batch * args.grad_accum) as f64 / seconds.max(1e-9),
        match workers {
            1 => String::new(),
            n => format!(" on {n} workers"),
        },
        match precision {
            Precision::F32 => String::new(),
            p => format!(", {} passes", p.name()),
        },
        trainer.losses.last().map_or(f64::NAN, |l| l.1),
        args.out.join("model").display()
    );
    Ok(())
}

/// Whether `B` computes on the host (its memory is the machine's RAM).
fn is_cpu<B: AutodiffBackend>() -> bool {
    let name = std::any::type_name::<B::InnerBackend>();
    name.contains("Flex") || name.contains("NdArray")
}

/// `train --plan`: the table, and what fits on common device sizes.
fn print_plan(plan: &TrainMemoryPlan, batch: usize, grad_accum: usize, workers: usize) {
    println!(
        "memory plan per device ({workers} device(s), batch {batch} × grad-accum {grad_accum}):"
    );
    for (what, bytes) in plan.rows() {
        println!("  {what:<58} {:>10}", human(bytes));
    }
    for gb in [24u64, 40, 80] {
        let rows = plan.max_micro_batch(gb * 1_000_000_000);
        println!(
            "  a {gb} GB device fits a micro-batch of {rows} (then --grad-accum for a larger batch)"
        );
    }
}

/// Refuse a run whose plan exceeds `max_memory`, or the available RAM on a CPU backend.
fn check_plan(plan: &TrainMemoryPlan, max_memory: Option<u64>, on_cpu: bool) -> Result<()> {
    let (limit, what) = match (max_memory, on_cpu.then(available_ram).flatten()) {
        (Some(m), _) => (m, "--max-memory"),
        (None, Some(ram)) => (ram, "available RAM; --max-memory sets another"),
        (None, None) => return Ok(()),
    };
    if plan.total() > limit {
        let parts: Vec<String> = plan
            .rows()
            .iter()
            .filter(|(w, b)| *b > 0 && w != "total")
            .map(|(w, b)| format!("{} {}", human(*b), w.split(" (").next().unwrap_or(w)))
            .collect();
        bail!(OutOfMemory(format!(
            "this run needs about {} per device ({}); the limit is {} ({what}). A smaller \
             --batch with --grad-accum keeps the batch; --ema-decay 0 drops the EMA copy; \
             `train --plan` shows the figures",
            human(plan.total()),
            parts.join(" + "),
            human(limit),
        )));
    }
    Ok(())
}

/// `data`'s images encoded by the frozen VAE of `source` (once, before training).
fn encode_images<B: AutodiffBackend>(
    data: &ImageTextDataset,
    source: &ModelSource,
    device: &B::Device,
) -> Result<EncodedImages> {
    let (cfg, vae) = load_vae::<B::InnerBackend>(source, "vae", device)
        .context("loading the VAE that encodes --data")?;
    let bar = crate::progress_bar(data.len() as u64);
    bar.set_message("encoding --data with the VAE");
    let encoded = EncodedImages::encode(data, &vae, cfg.in_channels, 16, device, |done, _| {
        bar.set_position(done as u64)
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    crate::note!(
        "encoded {} images to {:?} latents with the frozen VAE",
        encoded.len(),
        encoded.shape
    );
    Ok(encoded)
}

/// The training samples must be what the model makes: its channels, and a size its UNet can
/// halve at every level (a latent UNet runs at any such size, e.g. SD-1.5 at 32² latents).
fn check_shapes(
    spec: &ModelSpec,
    data: &TrainData,
    latent: bool,
    init: Option<&Path>,
) -> Result<()> {
    let shape = spec.image_shape().map_err(anyhow::Error::msg)?;
    let cfg = spec.unet_config().map_err(anyhow::Error::msg)?;
    let [c, h, w] = data.shape();
    let what = match data {
        TrainData::Pairs(_) => "the pairs hold",
        TrainData::Latents(_) => "the encoded images are",
        TrainData::Images(_) => "the training data is",
    };
    let name = init.map_or("the model".into(), |p| format!("--init {}", p.display()));
    if c != shape[0] {
        let hint = match (latent, data) {
            (true, _) => format!(
                "{name} is a latent-space model (it has a vae/) whose UNet takes {}-channel \
                 latents",
                shape[0]
            ),
            (false, _) => {
                format!("{name} is a pixel-space model (no vae/) making {shape:?} images")
            }
        };
        bail!(
            "{hint}, but {what} {:?} samples — pairs or data made for {} model?",
            [c, h, w],
            if latent {
                "a pixel-space"
            } else {
                "a latent-space"
            }
        );
    }
    let factor = 1usize << cfg.block_out_channels.len().saturating_sub(1);
    let fits = match latent {
        true => h % factor == 0 && w % factor == 0,
        false => [c, h, w] == shape,
    };
    ensure!(
        fits,
        "the model makes {shape:?} samples but {what} {:?}",
        [c, h, w]
    );
    Ok(())
}

/// Ends the process when the machines of a run stop making progress together: a machine that
/// died or cannot be reached would otherwise leave the others waiting in an all-reduce forever.
struct Watchdog {
    state: Arc<std::sync::Mutex<(Instant, Phase)>>,
}

/// What the watchdog waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every machine to join.
    Joining,
    /// The next step.
    Training,
    /// Nothing: the run is over.
    Done,
}

impl Watchdog {
    fn start(timeout: u64) -> Self {
        let state = Arc::new(std::sync::Mutex::new((Instant::now(), Phase::Joining)));
        let watched = state.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let (since, what) = *watched.lock().expect("watchdog lock");
                if what == Phase::Done {
                    return;
                }
                if since.elapsed().as_secs() >= timeout {
                    let why = match what {
                        Phase::Joining => {
                            "not every machine joined (is the coordinator reachable, and \
                                    did every --node-rank start?)"
                        }
                        _ => "no step finished (another machine stopped or cannot be reached)",
                    };
                    eprintln!(
                        "error: {why} within --peer-timeout {timeout} s; the last checkpoint is kept"
                    );
                    crate::memory::exit_now(1);
                }
            }
        });
        Self { state }
    }

    /// Something happened: the clock starts again.
    fn progress(&self, what: Phase) {
        *self.state.lock().expect("watchdog lock") = (Instant::now(), what);
    }

    fn stop(&self) {
        self.progress(Phase::Done);
    }
}

/// What one worker did in this run (for train.json).
struct WorkerReport {
    rank: usize,
    device: String,
    steps: usize,
    seconds: f64,
    all_reduce_seconds: f64,
}

impl WorkerReport {
    fn of<B: AutodiffBackend>(
        trainer: &Trainer<B>,
        rank: usize,
        device: &B::Device,
        first: usize,
        start: Instant,
    ) -> Self {
        Self {
            rank,
            device: format!("{device:?}"),
            steps: trainer.step - first,
            seconds: start.elapsed().as_secs_f64(),
            all_reduce_seconds: trainer.all_reduce_seconds,
        }
    }

    fn json(&self, share: usize) -> serde_json::Value {
        serde_json::json!({
            "rank": self.rank,
            "device": self.device,
            "steps": self.steps,
            "samples_per_second": (self.steps * share) as f64 / self.seconds.max(1e-9),
            "all_reduce_seconds": self.all_reduce_seconds,
        })
    }
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
