//! The default model compiled into the binary (`models/instaflow-shapes`, f16): a one-step
//! generator of 32×32 shapes in colours, trained with this tool's own pipeline, used when
//! `generate` gets no `--model`.

use std::collections::BTreeMap;

use instaflow::sd::source::ModelSource;

/// Name of the embedded model in messages and reports.
pub const NAME: &str = "built-in instaflow-shapes";

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        [$(($path, include_bytes!(concat!("../../../models/instaflow-shapes/", $path)).as_slice())),*]
    };
}

/// Every file of the embedded model folder.
const FILES: [(&str, &[u8]); 8] = files![
    "model_index.json",
    "prompts.json",
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

/// The prompts the embedded model was trained to know (its `prompts.json`), one per line as
/// `generate --help` lists them.
pub fn prompts_help() -> String {
    #[derive(serde::Deserialize)]
    struct Entry {
        prompt: String,
    }
    let (_, json) = FILES
        .iter()
        .find(|(path, _)| *path == "prompts.json")
        .expect("the embedded model lists its prompts");
    let list: Vec<Entry> =
        serde_json::from_slice(json).expect("the embedded prompts.json is valid");
    let lines: Vec<String> = list
        .chunks(4)
        .map(|c| {
            let row: Vec<&str> = c.iter().map(|e| e.prompt.as_str()).collect();
            format!("  {}", row.join(" · "))
        })
        .collect();
    format!(
        "The built-in model (no --model) knows these {} prompts, eight shapes in eight colours:\n{}\n\
         Other prompts get its nearest guess.",
        list.len(),
        lines.join("\n")
    )
}

/// A source with the CLIP tokenizer (`tokenizer/`), for models trained from scratch.
pub fn tokenizer() -> ModelSource {
    default_model()
}
