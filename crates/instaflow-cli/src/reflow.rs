//! `instaflow reflow`: generate (noise, ODE result) pairs from a teacher for reflow or distillation,
//! sharded and resumable.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use indicatif::ProgressStyle;
use instaflow::flow::solvers::{Rk45Options, Solver};
use instaflow::sd::pipeline::InstaFlowPipeline;
use instaflow::sd::source::ModelSource;
use instaflow::sd::tokenizer::ClipTokenizer;
use instaflow::training::data::ImageTextDataset;
use instaflow::training::prompts::read_prompts;
use instaflow::training::reflow::{PairPlan, census, generate_shard};

use crate::backend::{BackendChoice, resolve};
use crate::with_backend;

/// Options of `instaflow reflow`.
#[derive(Debug, Args)]
pub struct ReflowArgs {
    /// The teacher: a diffusers folder (e.g. `RUN/model` from `train`), or a Hugging Face id
    /// (`hf:ORG/NAME[@REV]`) read from the hub's cache and downloaded when missing.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (pairs.json + shard-*/chunk-*.safetensors). Rerun with the same settings to
    /// resume; other shards may write into the same folder.
    #[arg(long)]
    out: PathBuf,
    /// Prompt set D_T: a text file with one prompt per line, or JSONL with a "prompt",
    /// "caption" or "text" field (LAION/COCO-style exports), read line by line. Empty lines are
    /// skipped and prompts longer than CLIP's 77 tokens noted, by line number.
    #[arg(long, conflicts_with = "data")]
    prompts: Option<PathBuf>,
    /// Read at most this many prompts of --prompts.
    #[arg(long, value_name = "N")]
    max_prompts: Option<usize>,
    /// Use every caption of this data set (from `instaflow data`) as the prompt set.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Number of pairs in the whole set (all shards).
    #[arg(long, default_value_t = 10_000)]
    pairs: usize,
    /// This process's part, `i/n` (0-based): it makes pairs i, i+n, i+2n, … Run n processes (on
    /// other GPUs or machines) with the same --out to split the work.
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// ODE solver: `euler:N` (N steps) or `rk45:TOL` (adaptive Dormand–Prince, rtol = atol = TOL)
    /// for rectified-flow teachers; `dpm:N` or `ddim:N` for ε-prediction Stable Diffusion
    /// teachers (the probability-flow ODE by DPM-Solver++ 2M — what the InstaFlow paper used for
    /// its SD 1.5 pairs, e.g. dpm:25 — or by deterministic DDIM; settings from
    /// scheduler/scheduler_config.json, else SD 1.5's).
    #[arg(long, default_value = "euler:25")]
    solver: String,
    /// Guidance α of the teacher (1 = plain conditional).
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// Seed of the noise (pair i always gets the same noise).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pairs per chunk file (the unit of resumption).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Samples per solver batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
}

/// How the teacher's ODE is solved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TeacherSolver {
    /// A rectified-flow teacher and one of the crate's ODE solvers.
    Flow(Solver),
    /// An ε-prediction SD teacher through deterministic DDIM with this many steps.
    Ddim(usize),
    /// An ε-prediction SD teacher through DPM-Solver++ (2M) with this many steps.
    Dpm(usize),
}

impl TeacherSolver {
    /// The ε-prediction scheduler's step count, if this is one.
    fn sd_steps(self) -> Option<usize> {
        match self {
            Self::Ddim(n) | Self::Dpm(n) => Some(n),
            Self::Flow(_) => None,
        }
    }
}

/// Parse `euler:N`, `rk45:TOL`, `dpm:N` or `ddim:N`.
pub fn parse_solver(s: &str) -> Result<TeacherSolver> {
    let (name, arg) = s.split_once(':').unwrap_or((s, ""));
    if name == "ddim" || name == "dpm" {
        let steps: usize = arg.parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("--solver {s}: {name} needs a positive step count, e.g. {name}:25")
        })?;
        return Ok(if name == "dpm" {
            TeacherSolver::Dpm(steps)
        } else {
            TeacherSolver::Ddim(steps)
        });
    }
    parse_flow_solver(s).map(TeacherSolver::Flow)
}

fn parse_flow_solver(s: &str) -> Result<Solver> {
    let (name, arg) = s.split_once(':').unwrap_or((s, ""));
    match name {
        "euler" => {
            let steps: usize = arg.parse().ok().filter(|&n| n > 0).with_context(|| {
                format!("--solver {s}: euler needs a positive step count, e.g. euler:25")
            })?;
            Ok(Solver::Euler { steps })
        }
        "rk45" => {
            let tol: f64 = if arg.is_empty() {
                1e-3
            } else {
                arg.parse()
                    .ok()
                    .filter(|&t: &f64| t > 0.0)
                    .with_context(|| {
                        format!("--solver {s}: rk45 needs a positive tolerance, e.g. rk45:1e-3")
                    })?
            };
            Ok(Solver::Rk45(Rk45Options {
                rtol: tol,
                atol: tol,
                max_steps: 1000,
            }))
        }
        _ => bail!("--solver {s}: expected euler:N, rk45:TOL, dpm:N or ddim:N"),
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once('/')
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("--shard {s}: expected i/n with 0 ≤ i < n, e.g. 0/4"),
    }
}

/// Run `instaflow reflow`.
pub fn run(choice: BackendChoice, mut args: ReflowArgs) -> Result<()> {
    let (shard, of) = parse_shard(&args.shard)?;
    let solver = parse_solver(&args.solver)?;
    ensure!(
        args.pairs > 0 && args.chunk > 0 && args.batch > 0,
        "--pairs, --chunk and --batch must be positive"
    );
    ensure!(
        args.pairs <= instaflow::training::reflow::MAX_PAIRS,
        "--pairs {}: at most {} pairs per folder",
        args.pairs,
        instaflow::training::reflow::MAX_PAIRS
    );
    ensure!(
        args.guidance.is_finite(),
        "--guidance must be a finite number"
    );
    args.model = crate::hub::model_folder(&args.model, !crate::quiet())?;
    let prompts = match (&args.prompts, &args.data) {
        (Some(p), _) => prompt_set(p, &args)?,
        (_, Some(d)) => ImageTextDataset::load(d)?.all_captions(),
        _ => bail!("give the prompt set: --prompts FILE or --data DIR"),
    };
    let selected = resolve(choice)?;
    crate::note!("backend: {}", selected.name());
    with_backend!(&selected, B, device => pairs::<B>(&args, prompts, solver, shard, of, &device))
}

/// `--prompts`, with what was skipped or will be truncated said once.
fn prompt_set(path: &Path, args: &ReflowArgs) -> Result<Vec<String>> {
    ensure!(
        args.max_prompts != Some(0),
        "--max-prompts must be positive"
    );
    let source = ModelSource::dir(&args.model);
    let tokenizer = ClipTokenizer::from_source(&source, "tokenizer").ok();
    let set = read_prompts(path, args.max_prompts, tokenizer.as_ref())
        .with_context(|| format!("--prompts {}", path.display()))?;
    if set.empty.count > 0 {
        crate::note!("--prompts: skipped {} empty line(s)", set.empty);
    }
    if set.truncated.count > 0 {
        crate::note!(
            "--prompts: {} prompt(s) longer than CLIP's 77 tokens; the text encoder sees their start",
            set.truncated
        );
    }
    if set.capped {
        crate::note!(
            "--prompts: the first {} prompts (--max-prompts)",
            set.prompts.len()
        );
    }
    Ok(set.prompts)
}

fn pairs<B: Backend>(
    args: &ReflowArgs,
    prompts: Vec<String>,
    solver: TeacherSolver,
    shard: usize,
    of: usize,
    device: &B::Device,
) -> Result<()> {
    let pipe = InstaFlowPipeline::<B>::load(&ModelSource::dir(&args.model), device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let (h, w) = pipe.unet_config.latent_size();
    let plan = PairPlan {
        prompts,
        total: args.pairs,
        seed: args.seed,
        shape: [pipe.unet_config.in_channels, h, w],
        chunk: args.chunk,
        teacher: std::fs::canonicalize(&args.model)?.display().to_string(),
        solver: args.solver.clone(),
        guidance: args.guidance,
    };
    let bar = crate::progress_bar(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} pairs {per_sec} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    let negative_one = pipe.encode_prompts(&[""], device)?;
    let scheduler = match solver {
        TeacherSolver::Ddim(_) | TeacherSolver::Dpm(_) => {
            let source = ModelSource::dir(&args.model);
            let cfg = if source.exists("scheduler/scheduler_config.json") {
                instaflow::sd::pipeline::read_config::<instaflow::sd::ddim::SchedulerConfig>(
                    &source,
                    "scheduler",
                )?
            } else {
                instaflow::sd::ddim::SchedulerConfig::default()
            };
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("{}/scheduler: {e}", args.model.display()))?;
            Some(cfg)
        }
        TeacherSolver::Flow(_) => None,
    };
    let start = std::time::Instant::now();
    let mut nfe = 0usize;
    let solve = |_: &[usize], prompts: &[&str], noise: Vec<f32>| -> Result<Vec<f32>, String> {
        let per = noise.len() / prompts.len();
        let mut out = Vec::with_capacity(noise.len());
        for (ps, zs) in prompts
            .chunks(args.batch)
            .zip(noise.chunks(args.batch * per))
        {
            let n = ps.len();
            let text = pipe.encode_prompts(ps, device).map_err(|e| e.to_string())?;
            let negative = negative_one.clone().repeat_dim(0, n);
            let z0 = Tensor::<B, 4>::from_data(
                TensorData::new(zs.to_vec(), [n, plan.shape[0], h, w]),
                device,
            );
            let x = match (solver, &scheduler) {
                (TeacherSolver::Flow(solver), _) => {
                    let sol = pipe.solve(z0, &text, &negative, args.guidance, solver);
                    nfe += sol.nfe;
                    sol.x
                }
                (sd, Some(cfg)) => {
                    let steps = sd.sd_steps().expect("an ε-prediction scheduler");
                    nfe += steps * if args.guidance == 1.0 { 1 } else { 2 };
                    let sample = if matches!(sd, TeacherSolver::Dpm(_)) {
                        instaflow::sd::dpm_solver::dpm_solver_sample
                    } else {
                        instaflow::sd::ddim::ddim_sample
                    };
                    sample(&pipe.unet, z0, &text, &negative, args.guidance, steps, cfg)
                }
                (_, None) => unreachable!("scheduler read above"),
            };
            out.extend(
                x.into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| format!("{e:?}"))?,
            );
        }
        Ok(out)
    };
    let made = generate_shard(&plan, &args.out, shard, of, solve, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let c = census(&args.out)?;
    println!(
        "shard {shard}/{of}: {made} new pairs in {seconds:.1} s ({:.2} pairs/s, {nfe} solver evaluations); \
         folder holds {}/{} pairs ({} missing, {} duplicated)",
        made as f64 / seconds.max(1e-9),
        c.present,
        plan.total,
        c.missing,
        c.duplicates.len()
    );
    Ok(())
}
