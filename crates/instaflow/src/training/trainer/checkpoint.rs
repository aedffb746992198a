//! Checkpoints of a training run: model, EMA, optimizer state and progress, replaced atomically.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::Optimizer;
use burn::record::Recorder;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use super::{Rec, Stage, TrainConfig, Trainer};
use crate::training::data::DataError;
use crate::training::precision::{LossScaler, Precision};

/// Saved progress next to the weights of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    stage: Stage,
    config: TrainConfig,
    losses: Vec<(usize, f64)>,
    /// The f16 loss scale (absent in f32/bf16 runs and in older checkpoints).
    #[serde(default)]
    loss_scaler: Option<LossScaler>,
}

/// Whether every float parameter is finite (checked before a checkpoint replaces the last one).
struct AllFinite(bool);

impl<B: Backend> ModuleVisitor<B> for AllFinite {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.0 {
            let sum: f64 = param.val().abs().sum().into_scalar().elem();
            self.0 = sum.is_finite();
        }
    }
}

/// The checkpoint folder to resume from: `dir`, or its `.old` twin if a save was cut short.
pub fn checkpoint_to_resume(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.with_extension("old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
}

fn ckpt_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Invalid {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Write model, EMA, optimizer state and progress to `dir` (replaced atomically: a crash
    /// leaves either the previous checkpoint or the new one).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), DataError> {
        // Weights that diverged never replace the last good checkpoint.
        let mut finite = AllFinite(true);
        self.model.visit(&mut finite);
        if let Some(ema) = &self.ema {
            ema.visit(&mut finite);
        }
        if !finite.0 {
            return Err(ckpt_err(
                dir,
                format!(
                    "the weights are not finite after step {}; {} (lower --lr)",
                    self.step,
                    if dir.exists() {
                        "the previous checkpoint is kept: --resume continues from it"
                    } else {
                        "no checkpoint was written"
                    }
                ),
            ));
        }
        let tmp = dir.with_extension("tmp");
        let old = dir.with_extension("old");
        let write = || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            let rec = Rec::new();
            rec.record(self.model.clone().into_record(), tmp.join("model"))
                .map_err(|e| e.to_string())?;
            if let Some(ema) = &self.ema {
                rec.record(ema.clone().into_record(), tmp.join("ema"))
                    .map_err(|e| e.to_string())?;
            }
            rec.record(self.optim.to_record(), tmp.join("optim"))
                .map_err(|e| e.to_string())?;
            let state = State {
                step: self.step,
                stage: self.stage,
                config: self.config.clone(),
                losses: self.losses.clone(),
                loss_scaler: (self.config.precision == Precision::F16)
                    .then(|| self.loss_scaler.clone()),
            };
            std::fs::write(
                tmp.join("state.json"),
                serde_json::to_vec(&state).expect("json"),
            )
            .map_err(|e| e.to_string())
        };
        // A failed write (a full disk, say) leaves the last checkpoint as it was.
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            let kept = if dir.exists() {
                "the previous checkpoint is kept"
            } else {
                "no earlier checkpoint exists"
            };
            return Err(ckpt_err(
                &tmp,
                format!(
                    "writing the step-{} checkpoint failed ({e}); {kept}",
                    self.step
                ),
            ));
        }
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old).map_err(|e| ckpt_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| ckpt_err(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Continue from a checkpoint written by [`Trainer::save_checkpoint`]. The stage and settings
    /// must match the run being resumed.
    pub fn resume(&mut self, dir: &Path) -> Result<(), DataError> {
        let state_path = dir.join("state.json");
        let text = std::fs::read(&state_path).map_err(|e| ckpt_err(&state_path, e))?;
        let state: State = serde_json::from_slice(&text).map_err(|e| ckpt_err(&state_path, e))?;
        if state.stage != self.stage {
            return Err(ckpt_err(
                &state_path,
                format!(
                    "checkpoint is a {:?} run, not {:?}",
                    state.stage, self.stage
                ),
            ));
        }
        let rec = Rec::new();
        let model = rec
            .load(dir.join("model"), &self.device)
            .map_err(|e| ckpt_err(dir, e))?;
        // A run without an EMA saves none (and one resumed with an EMA starts it afresh).
        let ema = match &self.ema {
            Some(_) if dir.join("ema.mpk").is_file() => Some(
                rec.load(dir.join("ema"), &self.device)
                    .map_err(|e| ckpt_err(dir, e))?,
            ),
            _ => None,
        };
        let optim = rec
            .load(dir.join("optim"), &self.device)
            .map_err(|e| ckpt_err(dir, e))?;
        self.model = self.model.clone().load_record(model);
        match (self.ema.take(), ema) {
            (Some(average), Some(record)) => self.ema = Some(average.load_record(record)),
            (Some(_), None) => self.ema = Some(self.model.valid()),
            (None, _) => {}
        }
        self.optim = self.optim.clone().load_record(optim);
        self.step = state.step;
        self.losses = state.losses;
        // Only the length, the precision and checkpointing may change on resume.
        let (steps, precision) = (self.config.steps, self.config.precision);
        self.config = TrainConfig {
            steps,
            precision,
            checkpointing: self.config.checkpointing,
            ..state.config
        };
        self.loss_scaler = state.loss_scaler.unwrap_or_default();
        // The record holds f32 values: store a frozen text encoder as a fresh run does, once,
        // shared with the EMA (which never changes it).
        self.model = super::freeze(self.model.clone(), &self.config);
        if let (Some(ema), false) = (&mut self.ema, self.config.train_text_encoder) {
            ema.text_encoder = self.model.text_encoder.valid();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resume is bit for bit only if the saved progress parses back to the same floats.
    #[test]
    fn state_json_round_trips_every_float_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Losses are f32 values widened to f64; 1.5573029518127441 once came back one ulp off.
        let mut losses: Vec<(usize, f64)> = vec![(3, 1.557_302_951_812_744_1)];
        losses.extend((0..2000).map(|i| (i, rng.random::<f32>() as f64 * 4.0)));
        let config = TrainConfig {
            lr: 3e-3,
            ema_decay: 0.999_9,
            caption_dropout: rng.random::<f64>(),
            ..TrainConfig::default()
        };
        let state = State {
            step: 5,
            stage: Stage::Flow,
            config: config.clone(),
            losses: losses.clone(),
            loss_scaler: None,
        };
        let back: State = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(back.config, config);
        for ((_, a), (_, b)) in back.losses.iter().zip(&losses) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
        }
    }
}
