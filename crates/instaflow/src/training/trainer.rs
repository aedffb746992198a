//! Training a text-to-image rectified flow on the SD-1.5 architecture: 1-RF from caption–image
//! data, k-RF on reflow pairs, and one-step distillation — with AdamW, EMA weights, caption
//! dropout (for guidance) and checkpoints that resume bit for bit.
//!
//! Every random choice of step `s` (batch, captions, dropout, noise, times) comes from a generator
//! seeded by `(seed, s)`, so a resumed run draws exactly what an uninterrupted run would have.

mod checkpoint;
mod ema;

pub use checkpoint::checkpoint_to_resume;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::flow::losses::{TimeSampler, distillation_loss, one_step, rectified_flow_loss};
use crate::flow::noise;
use crate::flow::velocity::VelocityField;
use crate::sd::tokenizer::{ClipTokenizer, MAX_LENGTH};
use crate::training::data::ImageTextDataset;
#[cfg(not(target_arch = "wasm32"))]
use crate::training::data_parallel::Replica;
use crate::training::latents::EncodedImages;
#[cfg(not(target_arch = "wasm32"))]
use crate::training::lpips::Perceptual;
use crate::training::model::TextToImage;
use crate::training::precision::{HalfPrecision, LossScaler, Precision, unscale_gradients};
use crate::training::reflow::PairSet;

/// What a training run fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Rectified flow on independent (noise, image) draws: 1-RF.
    Flow,
    /// Rectified flow on (noise, ODE result) pairs: k-RF.
    Reflow,
    /// One-step distillation on pairs: `‖X0 + v(X0, 0) − X1‖²`.
    Distill,
}

/// What distillation compares the student's one step with the teacher's result by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DistillLoss {
    /// Mean squared error on the model's samples (InstaFlow's first stage).
    #[default]
    L2,
    /// LPIPS on images (decoded by the frozen VAE for latent models): InstaFlow's second stage.
    Lpips,
    /// Pseudo-Huber on the samples plus LPIPS, as 2-rectified flow++ (at t = 0, where its
    /// `(1 − t)` weight is 1).
    LpipsHuber,
}

impl DistillLoss {
    /// Whether it needs LPIPS weights.
    pub fn perceptual(self) -> bool {
        self != Self::L2
    }
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Total optimisation steps.
    pub steps: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak AdamW learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping.
    pub grad_clip: f64,
    /// EMA decay (warmed up as `min(decay, (1 + s)/(10 + s))`); 0 keeps no EMA copy (the
    /// trained weights themselves are exported; saves one copy of the trainable weights).
    pub ema_decay: f64,
    /// Probability of training on the empty caption (classifier-free guidance needs it).
    pub caption_dropout: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// The float type of forward and backward passes (the weights stay f32).
    #[serde(default)]
    pub precision: Precision,
    /// Micro-batches of `batch` examples whose gradients are summed before each update: one step
    /// sees `batch × grad_accum` examples, as one step with a batch that large would (the same
    /// draws), in the memory of `batch`.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Whether the text encoder trains too. Off, it is frozen: no gradients, no optimizer state,
    /// no EMA copy, and its weights are exported as they were (InstaFlow fine-tunes the UNet
    /// only). Models from scratch need it on (there is no pretrained CLIP to start from).
    #[serde(default = "yes")]
    pub train_text_encoder: bool,
    /// The distillation loss (distillation only).
    #[serde(default)]
    pub loss: DistillLoss,
    /// Gradient checkpointing: the backward pass recomputes memory-bound activations instead
    /// of keeping them (less memory, more compute; the same gradients). The trainer is generic
    /// over autodiff's checkpoint strategy, so the caller picks the backend from this; the
    /// memory plan reads it.
    #[serde(default)]
    pub checkpointing: bool,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 32,
            lr: 1e-3,
            warmup: 100,
            weight_decay: 1e-2,
            grad_clip: 1.0,
            ema_decay: 0.999,
            caption_dropout: 0.1,
            seed: 0,
            precision: Precision::F32,
            grad_accum: 1,
            train_text_encoder: true,
            loss: DistillLoss::L2,
            checkpointing: false,
        }
    }
}

/// What the model learns from.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// Captioned images (1-RF).
    Images(ImageTextDataset),
    /// Reflow pairs (k-RF or distillation).
    Pairs(PairSet),
    /// Captioned images encoded once by a frozen VAE (1-RF in latent space).
    Latents(EncodedImages),
}

impl TrainData {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Self::Images(d) => d.len(),
            Self::Pairs(p) => p.len(),
            Self::Latents(e) => e.len(),
        }
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape `[C, H, W]` of one example.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Self::Images(d) => [d.channels, d.height, d.width],
            Self::Pairs(p) => p.plan.shape,
            Self::Latents(e) => e.shape,
        }
    }
}

/// The loss of `stage`'s objective: the flow loss at times `t`, or distillation without them.
fn loss_of<B: Backend, V: VelocityField<B, 4>>(
    field: &V,
    x0: Tensor<B, 4>,
    x1: Tensor<B, 4>,
    t: Option<Tensor<B, 1>>,
    cond: &V::Cond,
) -> Tensor<B, 1> {
    match t {
        Some(t) => rectified_flow_loss(field, x0, x1, t, cond),
        None => distillation_loss(field, x0, x1, cond),
    }
}

type Optim<B> = OptimizerAdaptor<AdamW, TextToImage<B>, B>;
type Rec = burn::record::NamedMpkFileRecorder<burn::record::FullPrecisionSettings>;

/// With [`Trainer::skip_non_finite`], this many dropped batches in a row stop the run: the
/// weights themselves have diverged.
pub const MAX_SKIPPED_IN_A_ROW: usize = 10;

/// A training run in progress: model, EMA copy, optimizer state and loss history.
pub struct Trainer<B: AutodiffBackend> {
    /// The model being optimised.
    pub model: TextToImage<B>,
    /// Exponential moving average of the weights (what gets exported); none with
    /// `ema_decay` 0.
    pub ema: Option<TextToImage<B::InnerBackend>>,
    optim: Optim<B>,
    /// Steps done.
    pub step: usize,
    /// `(step, loss)` of every step.
    pub losses: Vec<(usize, f64)>,
    /// The settings.
    pub config: TrainConfig,
    /// What is being fitted.
    pub stage: Stage,
    /// Drop a batch whose loss is NaN/inf and go on (instead of stopping the run).
    pub skip_non_finite: bool,
    /// Steps whose batch was dropped for a non-finite loss (this run).
    pub skipped: Vec<usize>,
    /// Seconds spent averaging gradients with the other workers (this run).
    pub all_reduce_seconds: f64,
    /// The loss scale of `--precision f16`.
    pub loss_scaler: LossScaler,
    /// Steps not applied because their f16 gradients overflowed (this run).
    pub overflowed: Vec<usize>,
    #[cfg(not(target_arch = "wasm32"))]
    replica: Option<Replica>,
    #[cfg(not(target_arch = "wasm32"))]
    perceptual: Option<Perceptual<B>>,
    tokenizer: ClipTokenizer,
    empty_ids: Vec<u32>,
    device: B::Device,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Start from `model` (fresh, or initialised from a teacher).
    pub fn new(
        model: TextToImage<B>,
        config: TrainConfig,
        stage: Stage,
        tokenizer: ClipTokenizer,
        device: &B::Device,
    ) -> Result<Self, String> {
        let optim = AdamWConfig::new()
            .with_weight_decay(config.weight_decay as f32)
            .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(
                config.grad_clip as f32,
            )))
            .init();
        let empty_ids = tokenizer.encode("").map_err(|e| e.to_string())?;
        if config.grad_accum == 0 {
            return Err("grad_accum must be at least 1".into());
        }
        let model = freeze(model, &config);
        Ok(Self {
            ema: (config.ema_decay > 0.0).then(|| model.valid()),
            model,
            optim,
            step: 0,
            losses: Vec::new(),
            skip_non_finite: false,
            skipped: Vec::new(),
            all_reduce_seconds: 0.0,
            loss_scaler: LossScaler::default(),
            overflowed: Vec::new(),
            #[cfg(not(target_arch = "wasm32"))]
            replica: None,
            #[cfg(not(target_arch = "wasm32"))]
            perceptual: None,
            config,
            stage,
            tokenizer,
            empty_ids,
            device: device.clone(),
        })
    }

    /// The weights to export: the EMA, or the trained weights when there is none.
    pub fn exported(&self) -> TextToImage<B::InnerBackend> {
        match &self.ema {
            Some(ema) => ema.clone(),
            None => self.model.valid(),
        }
    }

    /// The learning rate at step `s` (linear warm-up, then constant).
    pub fn lr(&self, s: usize) -> f64 {
        self.config.lr * ((s + 1) as f64 / self.config.warmup.max(1) as f64).min(1.0)
    }

    /// Make this trainer one worker of a data-parallel group (joined with [`Replica::join`]): it
    /// computes its share of every batch and averages gradients with the others before updating.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn join_group(&mut self, replica: Replica) -> Result<(), String> {
        replica.check_batch(self.config.batch)?;
        self.replica = Some(replica);
        Ok(())
    }

    /// The LPIPS (and VAE) of a perceptual distillation loss; [`DistillLoss::Lpips`] and
    /// [`DistillLoss::LpipsHuber`] need it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn set_perceptual(&mut self, perceptual: Perceptual<B>) {
        self.perceptual = Some(perceptual);
    }

    /// The rows of a batch this trainer computes: all of them, or its share in a group.
    fn rows(&self, batch: usize) -> std::ops::Range<usize> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(r) = &self.replica {
            return r.rows(batch);
        }
        0..batch
    }

    /// `value` averaged over the group (itself without one).
    fn mean_over_group(&mut self, value: f64) -> Result<f64, String> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(r) = &self.replica {
            let start = web_time::Instant::now();
            let mean = r.mean::<B::InnerBackend>(&[value as f32], &self.device)?[0];
            self.all_reduce_seconds += start.elapsed().as_secs_f64();
            return Ok(mean as f64);
        }
        Ok(value)
    }

    /// `grads` averaged over the group (themselves without one).
    fn mean_gradients_over_group(
        &mut self,
        #[allow(unused_mut)] mut grads: GradientsParams,
    ) -> Result<GradientsParams, String> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(replica) = &self.replica {
            self.all_reduce_seconds += replica.mean_gradients(&self.model, &mut grads)?;
        }
        Ok(grads)
    }

    /// Whether any worker of the group says `yes` (itself without one): lets every worker stop
    /// after the same step when one of them is asked to.
    pub fn anyone(&mut self, yes: bool) -> Result<bool, String> {
        Ok(self.mean_over_group(if yes { 1.0 } else { 0.0 })? > 0.0)
    }

    fn ids(&self, captions: &[String]) -> Result<Tensor<B, 2, Int>, String> {
        let mut ids = Vec::with_capacity(captions.len() * MAX_LENGTH);
        for c in captions {
            let row = if c.is_empty() {
                self.empty_ids.clone()
            } else {
                self.tokenizer.encode(c).map_err(|e| e.to_string())?
            };
            ids.extend(row.into_iter().map(i64::from));
        }
        Ok(Tensor::from_data(
            TensorData::new(ids, [captions.len(), MAX_LENGTH]),
            &self.device,
        ))
    }

    /// One optimisation step; returns the loss before the update.
    pub fn train_step(&mut self, data: &TrainData) -> Result<f64, String> {
        if data.is_empty() {
            return Err("no training examples".into());
        }
        let s = self.step;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(s as u64);
        let (local, grads) = self.step_gradients(data, &mut rng)?;
        // The batch's loss: the mean of the workers' (equal shares), the same on every worker,
        // so that all of them take the same decision below.
        let value = self.mean_over_group(local)?;
        let scaled = self.config.precision == Precision::F16;
        if !value.is_finite() && self.skip_non_finite {
            // Every step has its own seeded draw, so skipping keeps the schedule of the rest.
            self.skipped.push(s);
            self.step += 1;
            let run = self
                .skipped
                .iter()
                .rev()
                .zip((0..=s).rev())
                .take_while(|(a, b)| *a == b);
            if run.count() >= MAX_SKIPPED_IN_A_ROW {
                return Err(format!(
                    "the loss was {value} for {MAX_SKIPPED_IN_A_ROW} steps in a row (last: step \
                     {s}): the weights have diverged, not one batch (lower --lr, then --resume)"
                ));
            }
            return Ok(value);
        }
        if !value.is_finite() {
            return Err(format!(
                "the loss became {value} at step {s}; nothing of this step was applied and the \
                 last checkpoint is kept (lower --lr, then --resume)"
            ));
        }
        let mut grads = self.mean_gradients_over_group(grads)?;
        // Gradients are the same on every worker after the mean, so all take the same decision.
        if scaled {
            let finite = unscale_gradients(&self.model, &mut grads, self.loss_scaler.scale);
            if !self.loss_scaler.update(finite) {
                self.overflowed.push(s);
                self.step += 1;
                self.losses.push((s, value));
                return Ok(value);
            }
        }
        self.model = self.optim.step(self.lr(s), self.model.clone(), grads);
        let decay = self.config.ema_decay.min((1 + s) as f64 / (10 + s) as f64);
        if let Some(average) = self.ema.take() {
            self.ema = Some(ema::update(average, &self.model, decay));
        }
        self.step += 1;
        self.losses.push((s, value));
        Ok(value)
    }

    /// This worker's mean loss and gradients for the step `rng` draws (before any averaging over
    /// workers): its rows of each of the `grad_accum` micro-batches, gradients summed.
    pub(crate) fn step_gradients(
        &self,
        data: &TrainData,
        rng: &mut ChaCha8Rng,
    ) -> Result<(f64, GradientsParams), String> {
        let (b, micro) = (self.config.batch, self.config.grad_accum);
        let draws = self.draw(data, b * micro, rng);
        let rows = self.rows(b);
        let scaled = self.config.precision == Precision::F16;
        // Micro-batch k is rows k·b … (k+1)·b of the step's draws; each adds the gradient of
        // its mean loss / micro, so the sum is the gradient of the whole batch's mean loss.
        let mut local = 0.0;
        let mut accumulated = GradientsAccumulator::<TextToImage<B>>::new();
        for k in 0..micro {
            let mine = k * b + rows.start..k * b + rows.end;
            let loss = self.micro_batch_loss(data, &draws, mine)?;
            local += loss.clone().into_scalar().elem::<f64>() / micro as f64;
            let loss = match (micro, scaled) {
                (1, false) => loss,
                (_, false) => loss / micro as f64,
                (_, true) => loss * (self.loss_scaler.scale / micro as f64),
            };
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            accumulated.accumulate(&self.model, grads);
        }
        Ok((local, accumulated.grads()))
    }

    /// The random choices of one step of `total` examples, in a fixed order (examples, captions,
    /// noise, caption dropout, times), so that they depend on (seed, step) only: every worker
    /// draws the whole batch and then computes its own rows, and `grad_accum` micro-batches draw
    /// what one batch of their total size would.
    fn draw(&self, data: &TrainData, total: usize, rng: &mut ChaCha8Rng) -> Draws {
        let idx: Vec<usize> = (0..total)
            .map(|_| rng.random_range(0..data.len()))
            .collect();
        let [c, h, w] = data.shape();
        let (mut captions, noise) = match data {
            TrainData::Images(d) => {
                let captions = idx.iter().map(|&i| d.caption(i, rng).to_string());
                let captions: Vec<String> = captions.collect();
                (captions, noise::standard_normal(rng, total * c * h * w))
            }
            TrainData::Latents(e) => {
                let captions = idx.iter().map(|&i| e.images.caption(i, rng).to_string());
                let captions: Vec<String> = captions.collect();
                (captions, noise::standard_normal(rng, total * c * h * w))
            }
            TrainData::Pairs(p) => (
                idx.iter().map(|&i| p.prompt(i).to_string()).collect(),
                Vec::new(),
            ),
        };
        if self.stage != Stage::Distill {
            for cap in captions.iter_mut() {
                if rng.random_bool(self.config.caption_dropout) {
                    cap.clear();
                }
            }
        }
        let t = match self.stage {
            Stage::Distill => None,
            Stage::Flow | Stage::Reflow => Some(TimeSampler::Uniform.sample(rng, total)),
        };
        Draws {
            idx,
            captions,
            noise,
            t,
        }
    }

    /// The loss of rows `rows` of a step's draws, with the graph for the backward pass.
    fn micro_batch_loss(
        &self,
        data: &TrainData,
        draws: &Draws,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor<B, 1>, String> {
        let [c, h, w] = data.shape();
        let n = c * h * w;
        let mine = &draws.idx[rows.clone()];
        let noise = || {
            let x0 = draws.noise[rows.start * n..rows.end * n].to_vec();
            Tensor::from_data(TensorData::new(x0, [rows.len(), c, h, w]), &self.device)
        };
        let (x0, x1) = match data {
            TrainData::Images(d) => (noise(), d.pixels::<B>(mine, &self.device)),
            TrainData::Latents(e) => (noise(), e.latents::<B>(mine, &self.device)),
            TrainData::Pairs(p) => p.tensors::<B>(mine, &self.device),
        };
        let ids = self.ids(&draws.captions[rows.clone()])?;
        let t = draws.t.as_ref().map(|t| {
            let t = t[rows.clone()].to_vec();
            Tensor::<B, 1>::from_data(TensorData::new(t, [rows.len()]), &self.device)
        });
        if self.stage == Stage::Distill && self.config.loss.perceptual() {
            let prediction = match self.config.precision.half() {
                None => one_step(&self.model, x0, &ids),
                Some(half) => one_step(&HalfPrecision::new(&self.model, half), x0, &ids),
            };
            return self.perceptual_loss(prediction, x1);
        }
        Ok(match self.config.precision.half() {
            None => loss_of(&self.model, x0, x1, t, &ids),
            Some(half) => loss_of(&HalfPrecision::new(&self.model, half), x0, x1, t, &ids),
        })
    }

    /// LPIPS (plus pseudo-Huber for [`DistillLoss::LpipsHuber`]) between the student's one step
    /// and the teacher's result, averaged over the rows.
    #[cfg(not(target_arch = "wasm32"))]
    fn perceptual_loss(
        &self,
        prediction: Tensor<B, 4>,
        target: Tensor<B, 4>,
    ) -> Result<Tensor<B, 1>, String> {
        let Some(perceptual) = &self.perceptual else {
            return Err(format!(
                "the {:?} distillation loss needs LPIPS weights (--lpips)",
                self.config.loss
            ));
        };
        let mut loss = perceptual.distance(prediction.clone(), target.clone());
        if self.config.loss == DistillLoss::LpipsHuber {
            let d = prediction.dims()[1..].iter().product::<usize>() as f64;
            loss = loss + crate::flow::losses::pseudo_huber(prediction, target, 0.00054 * d.sqrt());
        }
        Ok(loss.mean())
    }

    #[cfg(target_arch = "wasm32")]
    fn perceptual_loss(&self, _: Tensor<B, 4>, _: Tensor<B, 4>) -> Result<Tensor<B, 1>, String> {
        Err("perceptual distillation losses are not available in the browser".into())
    }
}

/// `model` with its text encoder frozen unless `config` trains it: no gradients, hence no
/// optimizer state and no EMA copy, and stored in the half type of `--precision bf16|f16`.
fn freeze<B: AutodiffBackend>(model: TextToImage<B>, config: &TrainConfig) -> TextToImage<B> {
    match config.train_text_encoder {
        true => model,
        false => TextToImage {
            text_encoder: crate::training::precision::frozen(model.text_encoder, config.precision),
            unet: model.unet,
        },
    }
}

/// What one step drew: example indices, captions (after dropout), noise (image data only) and
/// flow times (not for distillation), for every row of the step.
struct Draws {
    idx: Vec<usize>,
    captions: Vec<String>,
    noise: Vec<f32>,
    t: Option<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::T_NOISE;
    use crate::flow::losses::mse;
    use crate::flow::solvers::euler;
    use crate::flow::velocity::Guided;
    use crate::sd::source::ModelSource;
    use crate::test_util::{TB, device, to_vec};
    use crate::training::model::{Export, ModelSpec, save_model};
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::{
        BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
    };
    use burn::module::{Module, ModuleVisitor, Param};
    use std::path::Path;

    type AD = Autodiff<TB>;

    fn fixture() -> ImageTextDataset {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data/mnist-8");
        ImageTextDataset::load(&dir).expect("committed fixture")
    }

    fn tokenizer() -> ClipTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    fn trainer(stage: Stage, steps: usize, lr: f64) -> Trainer<AD> {
        trainer_on::<NoCheckpointing>(stage, steps, lr)
    }

    /// [`trainer`] on any autodiff wrapper of the test backend (the same weights on each).
    fn trainer_on<C: CheckpointStrategy>(
        stage: Stage,
        steps: usize,
        lr: f64,
    ) -> Trainer<Autodiff<TB, C>> {
        <TB as Backend>::seed(&device(), 7);
        let spec = ModelSpec::preset("tiny", 1, 8).unwrap();
        let model = spec.init::<Autodiff<TB, C>>(&device()).unwrap();
        let cfg = TrainConfig {
            steps,
            batch: 16,
            lr,
            warmup: 5,
            ema_decay: 0.9,
            ..TrainConfig::default()
        };
        Trainer::new(model, cfg, stage, tokenizer(), &device()).unwrap()
    }

    /// The sum of every parameter tensor, in visiting order.
    fn param_sums<B: Backend>(m: &TextToImage<B>) -> Vec<f32> {
        struct Sums(Vec<f32>);
        impl<B: Backend> ModuleVisitor<B> for Sums {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0.push(to_vec(p.val().sum())[0]);
            }
        }
        let mut s = Sums(Vec::new());
        m.visit(&mut s);
        s.0
    }

    fn mean(v: &[(usize, f64)]) -> f64 {
        v.iter().map(|p| p.1).sum::<f64>() / v.len() as f64
    }

    #[test]
    fn flow_loss_decreases() {
        let data = TrainData::Images(fixture());
        let mut t = trainer(Stage::Flow, 60, 3e-3);
        for _ in 0..60 {
            t.train_step(&data).unwrap();
        }
        let (first, last) = (mean(&t.losses[..10]), mean(&t.losses[50..]));
        assert!(last < 0.7 * first, "loss {first:.3} → {last:.3}");
    }

    /// Every gradient of `grads`, in the model's parameter order.
    fn gradient_values<A: AutodiffBackend<InnerBackend = TB>>(
        model: &TextToImage<A>,
        grads: &GradientsParams,
    ) -> Vec<Vec<f32>> {
        struct Values<'a>(&'a GradientsParams, Vec<Vec<f32>>);
        impl<A: AutodiffBackend<InnerBackend = TB>> ModuleVisitor<A> for Values<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<A, D>>) {
                if let Some(g) = self.0.get::<TB, D>(p.id) {
                    self.1.push(to_vec(g));
                }
            }
        }
        let mut v = Values(grads, Vec::new());
        model.visit(&mut v);
        v.1
    }

    #[test]
    fn two_accumulated_micro_batches_give_the_gradients_of_the_doubled_batch() {
        let data = TrainData::Images(fixture());
        let gradients = |batch: usize, grad_accum: usize| {
            let mut t = trainer(Stage::Flow, 1, 1e-3);
            t.config.batch = batch;
            t.config.grad_accum = grad_accum;
            let mut rng = ChaCha8Rng::seed_from_u64(t.config.seed);
            let (loss, grads) = t.step_gradients(&data, &mut rng).unwrap();
            (loss, gradient_values(&t.model, &grads))
        };
        let (loss_a, a) = gradients(16, 1);
        let (loss_b, b) = gradients(8, 2);
        let (loss_c, _) = gradients(8, 1);
        assert!((loss_a - loss_b).abs() < 1e-5, "{loss_a} vs {loss_b}");
        // Not the first half alone: the second micro-batch counts.
        assert!((loss_a - loss_c).abs() > 1e-4, "{loss_a} vs {loss_c}");
        assert_eq!(a.len(), b.len());
        let (mut worst, mut largest) = (0f32, 0f32);
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max(crate::test_util::max_abs_diff(x, y));
            largest = largest.max(x.iter().fold(0f32, |m, v| m.max(v.abs())));
        }
        assert!(largest > 1e-3, "gradients are all ~0 ({largest})");
        assert!(
            worst < 1e-5,
            "max gradient difference {worst} (largest {largest})"
        );
    }

    #[test]
    fn checkpointing_gives_the_gradients_of_storing_every_activation() {
        // Recomputing the memory-bound operations in the backward pass (what `--checkpointing`
        // selects) must not change a single gradient beyond rounding, with the text encoder
        // trained and frozen.
        let images = TrainData::Images(fixture());
        let stage = Stage::Flow;
        for train_text_encoder in [true, false] {
            let stored = {
                let mut t = trainer_on::<NoCheckpointing>(stage, 1, 1e-3);
                t.config.train_text_encoder = train_text_encoder;
                let t = Trainer::new(t.model, t.config, stage, tokenizer(), &device()).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(t.config.seed);
                let (loss, grads) = t.step_gradients(&images, &mut rng).unwrap();
                (loss, gradient_values(&t.model, &grads))
            };
            let recomputed = {
                let mut t = trainer_on::<BalancedCheckpointing>(stage, 1, 1e-3);
                t.config.train_text_encoder = train_text_encoder;
                let t = Trainer::new(t.model, t.config, stage, tokenizer(), &device()).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(t.config.seed);
                let (loss, grads) = t.step_gradients(&images, &mut rng).unwrap();
                (loss, gradient_values(&t.model, &grads))
            };
            assert!(
                (stored.0 - recomputed.0).abs() < 1e-6,
                "{} vs {}",
                stored.0,
                recomputed.0
            );
            assert_eq!(stored.1.len(), recomputed.1.len());
            let (mut worst, mut largest) = (0f32, 0f32);
            for (x, y) in stored.1.iter().zip(&recomputed.1) {
                worst = worst.max(crate::test_util::max_abs_diff(x, y));
                largest = largest.max(x.iter().fold(0f32, |m, v| m.max(v.abs())));
            }
            assert!(largest > 1e-3, "gradients are all ~0 ({largest})");
            assert!(
                worst < 1e-5,
                "max gradient difference {worst} (largest {largest})"
            );
        }
    }

    #[test]
    fn a_frozen_text_encoder_gets_no_gradients_and_keeps_its_weights() {
        let data = TrainData::Images(fixture());
        let mut t = trainer(Stage::Flow, 3, 3e-3);
        t.config.train_text_encoder = false;
        let text_before = param_sums(&TextToImage {
            text_encoder: t.model.text_encoder.valid(),
            unet: t.model.unet.valid(),
        });
        let mut t = Trainer::new(t.model, t.config, Stage::Flow, tokenizer(), &device()).unwrap();
        for _ in 0..3 {
            t.train_step(&data).unwrap();
        }
        let after = param_sums(&t.exported());
        let n_text = {
            let mut s = Vec::new();
            struct Count<'a>(&'a mut Vec<()>);
            impl<B: Backend> ModuleVisitor<B> for Count<'_> {
                fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
                    self.0.push(());
                }
            }
            t.model.text_encoder.visit(&mut Count(&mut s));
            s.len()
        };
        // The text encoder's parameters come first: bit for bit the same, in the EMA too.
        assert_eq!(after[..n_text], text_before[..n_text]);
        assert_ne!(after[n_text..], text_before[n_text..], "the UNet trained");
    }

    #[test]
    fn a_frozen_text_encoder_is_stored_in_the_half_type_and_changes_no_result() {
        let data = TrainData::Images(fixture());
        let t = trainer(Stage::Flow, 2, 3e-3);
        let config = TrainConfig {
            train_text_encoder: false,
            precision: Precision::Bf16,
            batch: 4,
            ..t.config.clone()
        };
        let as_loaded = t.model.text_encoder.clone().no_grad();
        let new = |model| Trainer::new(model, config.clone(), Stage::Flow, tokenizer(), &device());
        let mut stored = new(t.model.clone()).unwrap();
        // The reference: f32 storage, cast to bf16 by every pass.
        let mut cast = new(t.model).unwrap();
        cast.model.text_encoder = as_loaded;
        struct DTypes(Vec<burn::tensor::DType>);
        impl<B: Backend> ModuleVisitor<B> for DTypes {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0.push(p.val().dtype());
            }
        }
        let dtypes = |m: &TextToImage<AD>| {
            let (mut text, mut unet) = (DTypes(Vec::new()), DTypes(Vec::new()));
            m.text_encoder.visit(&mut text);
            m.unet.visit(&mut unet);
            (text.0, unet.0)
        };
        let (text, unet) = dtypes(&stored.model);
        assert!(
            text.iter().all(|d| *d == burn::tensor::DType::BF16),
            "{text:?}"
        );
        assert!(
            unet.iter().all(|d| *d == burn::tensor::DType::F32),
            "{unet:?}"
        );
        assert!(
            dtypes(&cast.model)
                .0
                .iter()
                .all(|d| *d == burn::tensor::DType::F32)
        );
        for _ in 0..2 {
            let (a, b) = (stored.train_step(&data), cast.train_step(&data));
            assert_eq!(a.unwrap(), b.unwrap());
        }
        // The UNets (beside one text encoder, for the helper's sake) trained the same.
        let text = cast.model.text_encoder.valid();
        let unet_sums = |t: &Trainer<AD>| {
            param_sums(&TextToImage {
                text_encoder: text.clone(),
                unet: t.model.unet.valid(),
            })
        };
        assert_eq!(unet_sums(&stored), unet_sums(&cast));
    }

    #[test]
    fn checkpoint_resumes_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("instaflow-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = TrainData::Images(fixture());
        let mut a = trainer(Stage::Flow, 6, 3e-3);
        for _ in 0..3 {
            a.train_step(&data).unwrap();
        }
        a.save_checkpoint(&dir).unwrap();
        let next_a: Vec<f64> = (0..3).map(|_| a.train_step(&data).unwrap()).collect();
        // A fresh process: other initial weights, then the checkpoint.
        let mut b = trainer(Stage::Flow, 6, 3e-3);
        b.train_step(&data).unwrap();
        let from = checkpoint_to_resume(&dir).unwrap();
        b.resume(&from).unwrap();
        assert_eq!(b.step, 3);
        let next_b: Vec<f64> = (0..3).map(|_| b.train_step(&data).unwrap()).collect();
        assert_eq!(next_a, next_b);
        assert_eq!(param_sums(&a.exported()), param_sums(&b.exported()));
        // A checkpoint of another stage is refused.
        let mut c = trainer(Stage::Distill, 6, 3e-3);
        assert!(c.resume(&from).unwrap_err().to_string().contains("Flow"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn distillation_brings_one_step_closer_to_the_teacher() {
        let data = fixture();
        let mut teacher = trainer(Stage::Flow, 80, 3e-3);
        let images = TrainData::Images(data.clone());
        for _ in 0..80 {
            teacher.train_step(&images).unwrap();
        }
        let teacher_model = teacher.model.valid();
        // Pairs from the teacher's 8-step ODE, written through the reflow module.
        let dir = std::env::temp_dir().join(format!("instaflow-distill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plan = crate::training::reflow::PairPlan {
            prompts: data.all_captions(),
            total: 96,
            seed: 3,
            shape: [1, 8, 8],
            chunk: 48,
            teacher: "test".into(),
            solver: "euler:8".into(),
            guidance: 1.0,
        };
        let tok = tokenizer();
        let dev = device();
        let ids_of = |prompts: &[&str]| {
            let ids: Vec<i64> = prompts
                .iter()
                .flat_map(|p| tok.encode(p).unwrap().into_iter().map(i64::from))
                .collect();
            Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [prompts.len(), MAX_LENGTH]), &dev)
        };
        let solve = |_: &[usize], prompts: &[&str], noise: Vec<f32>| {
            let z0 =
                Tensor::<TB, 4>::from_data(TensorData::new(noise, [prompts.len(), 1, 8, 8]), &dev);
            let ids = ids_of(prompts);
            let x = euler(
                &Guided::new(&teacher_model, &ids),
                z0,
                T_NOISE,
                1.0,
                8,
                false,
            )
            .x;
            Ok(to_vec(x))
        };
        crate::training::reflow::generate_shard(&plan, &dir, 0, 1, solve, |_, _| {}).unwrap();
        let pairs = PairSet::load(&dir).unwrap();
        // One-step error of a model on all pairs: ‖X0 + v(X0, 0) − X1‖².
        let one_step_error = |m: &TextToImage<TB>| {
            let rows: Vec<usize> = (0..pairs.len()).collect();
            let (x0, x1) = pairs.tensors::<TB>(&rows, &dev);
            let prompts: Vec<&str> = rows.iter().map(|&r| pairs.prompt(r)).collect();
            let one = euler(
                &Guided::new(m, &ids_of(&prompts)),
                x0,
                T_NOISE,
                1.0,
                1,
                false,
            )
            .x;
            to_vec(mse(one, x1))[0]
        };
        let before = one_step_error(&teacher_model);
        let mut student = Trainer::new(
            teacher.model.clone(),
            TrainConfig {
                steps: 60,
                ..teacher.config.clone()
            },
            Stage::Distill,
            tok.clone(),
            &dev,
        )
        .unwrap();
        let pair_data = TrainData::Pairs(pairs.clone());
        for _ in 0..60 {
            student.train_step(&pair_data).unwrap();
        }
        let after = one_step_error(&student.model.valid());
        assert!(
            after < 0.7 * before,
            "one-step error vs teacher ODE: {before:.4} → {after:.4}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exported_model_loads_in_the_pipeline_with_the_same_velocity() {
        let dir = std::env::temp_dir().join(format!("instaflow-export-{}", std::process::id()));
        let spec = ModelSpec::preset("tiny", 1, 8).unwrap();
        let model = spec.init::<TB>(&device()).unwrap();
        // save_model copies `tokenizer/` from a model source: lay the assets out that way.
        let tok = dir.join("src/tokenizer");
        std::fs::create_dir_all(&tok).unwrap();
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(assets.join(f), tok.join(f)).unwrap();
        }
        let tok_src = ModelSource::dir(dir.join("src"));
        for half in [false, true] {
            let out = dir.join(if half { "f16" } else { "f32" });
            let export = Export {
                base: &tok_src,
                half,
                text_encoder_frozen: false,
            };
            save_model(&model, &spec, &out, export).unwrap();
            let pipe = crate::sd::pipeline::InstaFlowPipeline::<TB>::load(
                &ModelSource::dir(&out),
                &device(),
            )
            .unwrap();
            assert!(pipe.vae.is_none());
            let z = crate::flow::noise::gaussian::<TB, 4>(
                &mut crate::flow::noise::rng(1),
                [2, 1, 8, 8],
                &device(),
            );
            let text = pipe
                .encode_prompts(&["a seven", "zero"], &device())
                .unwrap();
            let t = Tensor::<TB, 1>::from_floats([0.0, 0.5], &device());
            let ids = {
                let ids: Vec<i64> = ["a seven", "zero"]
                    .iter()
                    .flat_map(|p| pipe.tokenizer.encode(p).unwrap().into_iter().map(i64::from))
                    .collect();
                Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [2, MAX_LENGTH]), &device())
            };
            let a = to_vec(pipe.unet.velocity(z.clone(), t.clone(), &text));
            let b = to_vec(model.velocity(z, t, &ids));
            let err = crate::test_util::max_abs_diff(&a, &b);
            let tol = if half { 5e-2 } else { 1e-5 };
            assert!(err < tol, "half={half}: max difference {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
