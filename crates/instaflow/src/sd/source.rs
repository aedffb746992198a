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

/// A Hugging Face Hub model id: `hf:ORG/NAME[@REVISION]`, or bare `ORG/NAME[@REVISION]` when
/// `bare` is allowed (callers allow it only when no local folder of that name exists).
pub fn parse_hub_id(text: &str, bare: bool) -> Option<(String, String)> {
    let rest = match text.strip_prefix("hf:") {
        Some(rest) => rest,
        None if bare => text,
        None => return None,
    };
    let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let (org, name) = repo.trim_end_matches('/').split_once('/')?;
    let rev_ok = !revision.is_empty()
        && !revision.contains("..")
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    (ok(org) && ok(name) && rev_ok).then(|| (format!("{org}/{name}"), revision.to_string()))
}

/// The Hugging Face Hub's local cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (huggingface_hub's rules).
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// The snapshot folder of model `repo` (`ORG/NAME`) at `revision` (a branch or tag named in
/// `refs/`, or a commit hash) in the hub cache `cache`: `models--ORG--NAME/snapshots/COMMIT/`.
pub fn hub_snapshot(
    cache: &std::path::Path,
    repo: &str,
    revision: &str,
) -> Result<PathBuf, SourceError> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_cached = |what: String| SourceError {
        path: format!("hf:{repo}@{revision}"),
        message: format!("{what} in the Hugging Face cache {}", cache.display()),
    };
    if !root.is_dir() {
        return Err(not_cached("not found".into()));
    }
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = root.join("snapshots").join(&commit);
    if snapshot.is_dir() && !commit.contains('/') {
        Ok(snapshot)
    } else {
        Err(not_cached(format!("revision {revision} is not")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse() {
        let id = |s: &str, bare| parse_hub_id(s, bare);
        assert_eq!(
            id("hf:XCLiu/instaflow_0_9B_from_sd_1_5", false),
            Some(("XCLiu/instaflow_0_9B_from_sd_1_5".into(), "main".into()))
        );
        assert_eq!(
            id("hf:a/b@v1.0", false),
            Some(("a/b".into(), "v1.0".into()))
        );
        assert_eq!(id("a/b", true), Some(("a/b".into(), "main".into())));
        assert_eq!(id("a/b", false), None);
        for bad in [
            "hf:a",
            "hf:a/b/c",
            "hf:../b",
            "hf:a/b@../x",
            "hf:a/b@",
            "hf:a b/c",
        ] {
            assert_eq!(id(bad, false), None, "{bad}");
        }
    }

    #[test]
    fn hub_snapshots_resolve_through_refs() {
        let cache = std::env::temp_dir().join(format!("instaflow-hub-{}", std::process::id()));
        let root = cache.join("models--org--name");
        std::fs::create_dir_all(root.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            hub_snapshot(&cache, "org/name", "main").unwrap(),
            root.join("snapshots/abc123")
        );
        assert_eq!(
            hub_snapshot(&cache, "org/name", "abc123").unwrap(),
            root.join("snapshots/abc123")
        );
        let e = hub_snapshot(&cache, "org/name", "v2")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("revision v2 is not in the Hugging Face cache"),
            "{e}"
        );
        assert!(hub_snapshot(&cache, "org/other", "main").is_err());
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
