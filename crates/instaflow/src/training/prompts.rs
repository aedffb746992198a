//! Prompt sets D_T for reflow pair generation: plain text (one prompt per line) or JSONL with a
//! `prompt`, `caption` or `text` field (LAION and COCO caption exports), read line by line so a
//! file of millions of prompts is never held twice. Pairs refer to prompts by index.

use std::io::BufRead;
use std::path::Path;

use crate::sd::tokenizer::ClipTokenizer;

/// JSONL fields tried for the prompt, in order.
pub const PROMPT_FIELDS: [&str; 3] = ["prompt", "caption", "text"];

/// Line numbers kept per kind of remark (the counts are exact).
const KEPT_LINES: usize = 10;

/// Why a prompt file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line starting with `{` is not valid JSON.
    #[error("{path}:{line}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A JSON line without a string prompt field.
    #[error("{path}:{line}: no string field \"prompt\", \"caption\" or \"text\"")]
    NoField {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// Not one prompt in the file.
    #[error("{path}: no prompts (every line is empty)")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Lines of one kind: how many, and the first few line numbers (1-based).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    /// How many lines.
    pub count: usize,
    /// The first [`KEPT_LINES`] of them.
    pub first: Vec<usize>,
}

impl Lines {
    fn add(&mut self, line: usize) {
        self.count += 1;
        if self.first.len() < KEPT_LINES {
            self.first.push(line);
        }
    }
}

impl std::fmt::Display for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.first.iter().map(usize::to_string).collect();
        let more = if self.count > self.first.len() {
            ", …"
        } else {
            ""
        };
        write!(f, "{} (line {}{more})", self.count, shown.join(", "))
    }
}

/// The prompts of a file, and what was left out or shortened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptSet {
    /// The prompts, in file order.
    pub prompts: Vec<String>,
    /// Empty lines (skipped).
    pub empty: Lines,
    /// Prompts longer than CLIP's 77 tokens (kept; the text encoder sees their start only).
    pub truncated: Lines,
    /// Whether reading stopped at the `max` prompts asked for.
    pub capped: bool,
}

/// Read the prompts of `path`, at most `max` of them; with a tokenizer, prompts it truncates
/// are counted.
pub fn read_prompts(
    path: &Path,
    max: Option<usize>,
    tokenizer: Option<&ClipTokenizer>,
) -> Result<PromptSet, PromptError> {
    let shown = path.display().to_string();
    let io = |source| PromptError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut set = PromptSet::default();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if max.is_some_and(|m| set.prompts.len() >= m) {
            set.capped = true;
            break;
        }
        let number = i + 1;
        let line = line.map_err(io)?;
        let line = line.trim();
        if line.is_empty() {
            set.empty.add(number);
            continue;
        }
        let prompt = match line.starts_with('{') {
            true => json_prompt(line).map_err(|e| match e {
                Some(message) => PromptError::Json {
                    path: shown.clone(),
                    line: number,
                    message,
                },
                None => PromptError::NoField {
                    path: shown.clone(),
                    line: number,
                },
            })?,
            false => line.to_string(),
        };
        if prompt.trim().is_empty() {
            set.empty.add(number);
            continue;
        }
        if let Some(tok) = tokenizer
            && tok.is_truncated(&prompt).unwrap_or(false)
        {
            set.truncated.add(number);
        }
        set.prompts.push(prompt);
    }
    if set.prompts.is_empty() {
        return Err(PromptError::Empty { path: shown });
    }
    Ok(set)
}

/// The prompt of one JSON line: `Err(Some(message))` for bad JSON, `Err(None)` for no field.
fn json_prompt(line: &str) -> Result<String, Option<String>> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Some(e.to_string()))?;
    PROMPT_FIELDS
        .iter()
        .find_map(|f| value.get(f).and_then(|v| v.as_str()))
        .map(str::to_string)
        .ok_or(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("instaflow-prompts-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn text_and_jsonl_fields_with_empty_lines_counted() {
        let long = "red ".repeat(100);
        let path = file(
            "mixed",
            &format!(
                "a red heart\n\n{{\"caption\": \"a dog\", \"url\": \"x\"}}\n{{\"text\": \"a cat\"}}\n   \n{long}\n{{\"prompt\": \"\"}}\n"
            ),
        );
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let set = read_prompts(&path, None, Some(&tok)).unwrap();
        assert_eq!(set.prompts[..3], ["a red heart", "a dog", "a cat"]);
        assert_eq!(set.prompts.len(), 4);
        assert_eq!(
            set.empty,
            Lines {
                count: 3,
                first: vec![2, 5, 7]
            }
        );
        assert_eq!(
            set.truncated,
            Lines {
                count: 1,
                first: vec![6]
            }
        );
        assert!(!set.capped);
        let capped = read_prompts(&path, Some(2), None).unwrap();
        assert_eq!(capped.prompts, ["a red heart", "a dog"]);
        assert!(capped.capped);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let path = file("bad", "ok\n{\"url\": 1}\n");
        let err = read_prompts(&path, None, None).unwrap_err().to_string();
        assert!(
            err.ends_with(":2: no string field \"prompt\", \"caption\" or \"text\""),
            "{err}"
        );
        std::fs::write(&path, "ok\n{oops\n").unwrap();
        let err = read_prompts(&path, None, None).unwrap_err().to_string();
        assert!(err.contains(":2: invalid JSON"), "{err}");
        std::fs::write(&path, "\n \n").unwrap();
        let err = read_prompts(&path, None, None).unwrap_err().to_string();
        assert!(err.contains("no prompts"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
