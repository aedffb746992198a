//! The CLIP BPE tokenizer (ids equal to transformers' `CLIPTokenizer`), built with the `tokenizers`
//! crate from a diffusers `tokenizer/` folder's `vocab.json` + `merges.txt` (or `tokenizer.json`).

use std::collections::HashMap;
use std::path::Path;

use crate::sd::source::ModelSource;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Start-of-text token of CLIP.
pub const BOS: &str = "<|startoftext|>";
/// End-of-text token of CLIP (also SD-1.5's padding).
pub const EOS: &str = "<|endoftext|>";
/// CLIP's context length.
pub const MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenisation pattern (words, single digits, runs of other symbols, contractions).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Tokenizer problems.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The folder lacks the files.
    #[error("no tokenizer in {0}: expected vocab.json + merges.txt or tokenizer.json")]
    NotFound(String),
    /// A file is unreadable or malformed.
    #[error("tokenizer file {file}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Encoding failed.
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
}

/// CLIP tokenizer producing fixed-length id sequences `[BOS, …, EOS, PAD…]`.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClipTokenizer(bos {}, eos {}, pad {})",
            self.bos, self.eos, self.pad
        )
    }
}

fn invalid(file: &str, message: impl ToString) -> TokenizerError {
    TokenizerError::Invalid {
        file: file.into(),
        message: message.to_string(),
    }
}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder on disk.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        match (dir.parent(), dir.file_name()) {
            (Some(parent), Some(name)) => {
                Self::from_source(&ModelSource::dir(parent), &name.to_string_lossy())
            }
            _ => Err(TokenizerError::NotFound(dir.display().to_string())),
        }
    }

    /// Load the tokenizer folder `dir` of `source`. The pad token is read from
    /// `tokenizer_config.json` / `special_tokens_map.json` when present (SD-1.5 pads with EOS).
    pub fn from_source(source: &ModelSource, dir: &str) -> Result<Self, TokenizerError> {
        let file = |name: &str| format!("{dir}/{name}");
        let read = |name: &str| {
            source
                .read_string(&file(name))
                .map_err(|e| invalid(name, e.message))
        };
        let pad_token = ["tokenizer_config.json", "special_tokens_map.json"]
            .iter()
            .filter_map(|f| source.read_string(&file(f)).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .find_map(|j| match j.get("pad_token")? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(String::from),
            });
        if source.exists(&file("vocab.json")) && source.exists(&file("merges.txt")) {
            Self::from_vocab_merges(
                &read("vocab.json")?,
                &read("merges.txt")?,
                pad_token.as_deref(),
            )
        } else if source.exists(&file("tokenizer.json")) {
            let inner = read("tokenizer.json")?
                .parse::<Tokenizer>()
                .map_err(|e| invalid("tokenizer.json", e))?;
            Self::wrap(inner, pad_token.as_deref(), "tokenizer.json")
        } else {
            Err(TokenizerError::NotFound(source.display(dir)))
        }
    }

    /// Build from the contents of `vocab.json` and `merges.txt` (also used in the browser).
    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        pad_token: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).map_err(|e| invalid("vocab.json", e))?;
        let merges = merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| match line.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(invalid(
                    "merges.txt",
                    format!("line {}: expected two symbols, got {line:?}", i + 2),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| invalid("vocab.json/merges.txt", e))?;
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(|e| invalid("normalizer", e))?,
            ),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        let pre = PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(CLIP_PATTERN.into()),
                    SplitDelimiterBehavior::Removed,
                    true,
                )
                .map_err(|e| invalid("pre-tokenizer", e))?,
            ),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]);
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| invalid("normalizer", e))?;
        inner.with_pre_tokenizer(Some(pre));
        Self::wrap(inner, pad_token, "vocab.json")
    }

    fn wrap(inner: Tokenizer, pad_token: Option<&str>, file: &str) -> Result<Self, TokenizerError> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| invalid(file, format!("the vocabulary has no {t} token")))
        };
        Ok(Self {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: id(pad_token.unwrap_or(EOS))?,
            inner,
        })
    }

    /// The largest token id this tokenizer can produce.
    pub fn max_id(&self) -> u32 {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .chain([self.bos, self.eos, self.pad])
            .max()
            .unwrap_or(0)
    }

    /// Id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Whether `prompt` has more tokens than fit (they are cut by [`Self::encode`]).
    pub fn is_truncated(&self, prompt: &str) -> Result<bool, TokenizerError> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().len() > MAX_LENGTH - 2)
    }

    /// The whole tokenizer as one Hugging Face `tokenizer.json` (the single-file form of
    /// `vocab.json` + `merges.txt`, loaded by [`from_source`](Self::from_source) alike).
    pub fn to_tokenizer_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| invalid("tokenizer.json", e))
    }

    /// Ids of `prompt`: `BOS`, at most 75 tokens, `EOS`, padding to 77 (longer prompts are cut).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let body = enc.get_ids();
        let body = &body[..body.len().min(MAX_LENGTH - 2)];
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(MAX_LENGTH, self.pad);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path)
    }

    #[test]
    fn ids_equal_transformers_clip_tokenizer_on_tricky_prompts() {
        let tok = ClipTokenizer::from_dir(&repo("assets/clip-tokenizer")).unwrap();
        let text = std::fs::read_to_string(repo("tests/fixtures/parity/tokens.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(prompt).unwrap(), want, "prompt {prompt:?}");
        }
    }

    #[test]
    fn a_folder_with_only_tokenizer_json_gives_the_same_ids() {
        let tok = ClipTokenizer::from_dir(&repo("assets/clip-tokenizer")).unwrap();
        let json = tok.to_tokenizer_json().unwrap();
        let source = ModelSource::Memory {
            name: "json-only".into(),
            files: [("tokenizer/tokenizer.json".to_string(), json.into_bytes())].into(),
        };
        let from_json = ClipTokenizer::from_source(&source, "tokenizer").unwrap();
        for prompt in [
            "a red heart",
            "A photo of an astronaut riding a horse!!",
            "",
        ] {
            assert_eq!(
                from_json.encode(prompt).unwrap(),
                tok.encode(prompt).unwrap()
            );
        }
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let err = ClipTokenizer::from_dir(Path::new("/nonexistent/tokenizer")).unwrap_err();
        assert!(
            err.to_string().contains("expected vocab.json + merges.txt"),
            "{err}"
        );
    }
}
