//! Where the files of a diffusers model folder come from: a folder on disk, or a map of file
//! names to bytes (a model embedded in the binary, or files fetched by a browser).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The files of one diffusers folder, addressed by relative paths such as `unet/config.json`.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A folder on disk.
    Dir(PathBuf),
    /// In-memory files: `name` says where they came from in messages.
    Memory {
        /// A label for error messages (e.g. "embedded model").
        name: String,
        /// Relative path → contents.
        files: BTreeMap<String, Vec<u8>>,
    },
}

/// A file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SourceError {
    /// The file, as [`ModelSource::display`] names it.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl ModelSource {
    /// A folder on disk.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        Self::Dir(path.into())
    }

    /// How messages name `rel`.
    pub fn display(&self, rel: &str) -> String {
        match self {
            Self::Dir(d) => d.join(rel).display().to_string(),
            Self::Memory { name, .. } => format!("{name}: {rel}"),
        }
    }

    /// Whether the file `rel` exists.
    pub fn exists(&self, rel: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(rel).is_file(),
            Self::Memory { files, .. } => files.contains_key(rel),
        }
    }

    /// Whether the folder (or, in memory, any file under) `rel` exists.
    pub fn has_dir(&self, rel: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(rel).is_dir(),
            Self::Memory { files, .. } => {
                let prefix = format!("{}/", rel.trim_end_matches('/'));
                files.keys().any(|k| k.starts_with(&prefix))
            }
        }
    }

    /// The contents of `rel`.
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, SourceError> {
        match self {
            Self::Dir(d) => std::fs::read(d.join(rel)).map_err(|e| SourceError {
                path: self.display(rel),
                message: e.to_string(),
            }),
            Self::Memory { files, .. } => files.get(rel).cloned().ok_or_else(|| SourceError {
                path: self.display(rel),
                message: "not found".into(),
            }),
        }
    }

    /// The contents of `rel` as UTF-8 text.
    pub fn read_string(&self, rel: &str) -> Result<String, SourceError> {
        String::from_utf8(self.read(rel)?).map_err(|_| SourceError {
            path: self.display(rel),
            message: "not UTF-8 text".into(),
        })
    }

    /// The path of `rel` on disk, for sources that are folders (lets large weights be memory-mapped).
    pub fn path(&self, rel: &str) -> Option<PathBuf> {
        match self {
            Self::Dir(d) => Some(d.join(rel)),
            Self::Memory { .. } => None,
        }
    }
}
