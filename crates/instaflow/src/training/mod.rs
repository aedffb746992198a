//! Training: the trainer (1-RF, k-RF, distillation) and what it needs — the model it fits,
//! reflow pairs, caption–image data sets, several devices, mixed precision — and the classifier
//! behind the evaluation metrics.

pub mod classifier;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
pub mod data_parallel;
pub mod latents;
#[cfg(not(target_arch = "wasm32"))]
pub mod lpips;
pub mod memory_plan;
pub mod model;
pub mod precision;
pub mod prompts;
pub mod reflow;
pub mod trainer;

pub use model::{Export, ModelSpec, PRESETS, TextToImage, load_model, save_model};
pub use trainer::{
    DistillLoss, MAX_SKIPPED_IN_A_ROW, Stage, TrainConfig, TrainData, Trainer, checkpoint_to_resume,
};
