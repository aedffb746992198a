//! Files compiled into the binary: the CLIP tokenizer (for new models).

use std::collections::BTreeMap;

use instaflow::source::ModelSource;

/// The CLIP BPE tokenizer files as a model source with a `tokenizer/` folder.
pub fn tokenizer() -> ModelSource {
    let files = BTreeMap::from([
        (
            "tokenizer/vocab.json".to_string(),
            include_bytes!("../../../assets/clip-tokenizer/vocab.json").to_vec(),
        ),
        (
            "tokenizer/merges.txt".to_string(),
            include_bytes!("../../../assets/clip-tokenizer/merges.txt").to_vec(),
        ),
    ]);
    ModelSource::Memory {
        name: "built-in CLIP tokenizer".into(),
        files,
    }
}
