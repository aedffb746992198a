//! The default model compiled into the binary (`models/instaflow-emoji`, f16): a one-step
//! text-to-emoji generator trained with this tool, used when `generate` gets no `--model`.

use std::collections::BTreeMap;

use instaflow::sd::source::ModelSource;

/// Name of the embedded model in messages and reports.
pub const NAME: &str = "built-in instaflow-emoji";

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        [$(($path, include_bytes!(concat!("../../../models/instaflow-emoji/", $path)).as_slice())),*]
    };
}

/// Every file of the embedded model folder.
const FILES: [(&str, &[u8]); 7] = files![
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
];

/// The embedded default model as an in-memory diffusers folder.
pub fn default_model() -> ModelSource {
    ModelSource::Memory {
        name: NAME.into(),
        files: FILES
            .iter()
            .map(|(p, b)| (p.to_string(), b.to_vec()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// A source with the CLIP tokenizer (`tokenizer/`), for models trained from scratch.
pub fn tokenizer() -> ModelSource {
    default_model()
}
