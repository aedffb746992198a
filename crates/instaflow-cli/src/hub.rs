//! `--model` names: a folder on disk, or a Hugging Face Hub id resolved through the hub's local
//! cache, downloading what is missing.
//!
//! Downloads go through the `hf-hub` crate, so the cache is the one `huggingface_hub` (Python) uses:
//! `models--ORG--NAME/{blobs, snapshots/COMMIT, refs/REV}`; a model fetched by one is found by the
//! other. Only the files generation reads are fetched — configs, tokenizer and the safetensors
//! weights of the text encoder, UNet and VAE — never `.bin` duplicates or the safety checker.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use instaflow::sd::source::{ModelSource, hub_cache_dir, hub_snapshot, parse_hub_id};
use instaflow::sd::weights::{COMPONENTS, weight_files};
use instaflow::training::lpips::{BACKBONE_FILES, HEAD_FILES, LpipsWeights};

/// The tokenizer files a diffusers `tokenizer/` folder may hold (BPE pair, or one `tokenizer.json`).
const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The folder `--model` names: a folder on disk, or a Hugging Face Hub id (`hf:ORG/NAME[@REV]`,
/// or `ORG/NAME` when no such folder exists). Ids are read from the hub's local cache; what is
/// missing there is downloaded from `$HF_ENDPOINT` (default `https://huggingface.co`) unless
/// `HF_HUB_OFFLINE` is set. `show_progress` draws a bar per downloaded file.
pub fn model_folder(model: &Path, show_progress: bool) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let text = model.to_string_lossy();
    let Some((repo, revision)) = parse_hub_id(&text, true) else {
        bail!("--model {}: no such folder", model.display());
    };
    let cache =
        hub_cache_dir().context("no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME")?;
    let cached = hub_snapshot(&cache, &repo, &revision);
    if let Ok(snapshot) = &cached
        && missing_file(snapshot).is_none()
    {
        return Ok(snapshot.clone());
    }
    if offline() {
        let why = match cached {
            Ok(snapshot) => format!(
                "the cached copy {} lacks {} and HF_HUB_OFFLINE is set",
                snapshot.display(),
                missing_file(&snapshot).unwrap_or_default()
            ),
            Err(e) => format!(
                "{} (HF_HUB_OFFLINE is set, so nothing is downloaded)",
                e.message
            ),
        };
        if text.starts_with("hf:") {
            bail!("--model {text}: {why}");
        }
        bail!("--model {text}: no such folder, and as a Hugging Face id: {why}");
    }
    download(&cache, &repo, &revision, show_progress)
        .with_context(|| format!("--model {text}: downloading from {}", endpoint()))
}

/// The folder `--lpips` names: a folder on disk, or a Hub id (`hf:ORG/NAME[@REV]`) whose
/// repository holds the VGG16 backbone and the linear heads at its top level (any of
/// [`BACKBONE_FILES`] and [`HEAD_FILES`]); read from the hub's cache, the missing ones fetched
/// as for `--model`.
pub fn lpips_folder(spec: &Path) -> Result<PathBuf> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let text = spec.to_string_lossy();
    let Some((repo, revision)) = parse_hub_id(&text, true) else {
        bail!("--lpips {}: no such folder", spec.display());
    };
    let cache =
        hub_cache_dir().context("no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME")?;
    let complete = |dir: &Path| LpipsWeights::in_dir(dir).is_ok();
    let cached = hub_snapshot(&cache, &repo, &revision);
    match cached {
        Ok(snapshot) if complete(&snapshot) => return Ok(snapshot),
        Ok(snapshot) if offline() => {
            let e = LpipsWeights::in_dir(&snapshot).expect_err("checked above");
            bail!("--lpips {text}: {e} (HF_HUB_OFFLINE is set, so nothing is downloaded)")
        }
        Err(e) if offline() => bail!(
            "--lpips {text}: {} (HF_HUB_OFFLINE is set, so nothing is downloaded)",
            e.message
        ),
        _ => {}
    }
    let api = hub_api(&cache, &repo, &revision, true)?;
    let mut snapshot = None;
    for group in [&BACKBONE_FILES[..], &HEAD_FILES[..]] {
        for file in group {
            if let Some(path) = fetch(&api, file)? {
                snapshot = path.parent().map(Path::to_path_buf);
                break;
            }
        }
    }
    let snapshot = snapshot.with_context(|| {
        format!("--lpips {text}: the repository has none of {BACKBONE_FILES:?} and {HEAD_FILES:?}")
    })?;
    LpipsWeights::in_dir(&snapshot).with_context(|| format!("--lpips {text}"))?;
    Ok(snapshot)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

/// The first file generation needs that `folder` lacks, if any (components as `model_index.json`
/// lists them; the VAE only where it has one).
fn missing_file(folder: &Path) -> Option<String> {
    if !folder.join("model_index.json").is_file() {
        return Some("model_index.json".into());
    }
    let source = ModelSource::dir(folder);
    for (dir, stems) in COMPONENTS {
        let listed = dir != "vae" || folder.join("vae").is_dir();
        if listed && weight_files(&source, dir, stems).is_err() {
            return Some(format!("{dir}/ weights"));
        }
        if listed && !folder.join(dir).join("config.json").is_file() {
            return Some(format!("{dir}/config.json"));
        }
    }
    let tokenizer = folder.join("tokenizer");
    let has = |f: &str| tokenizer.join(f).is_file();
    if !(has("vocab.json") && has("merges.txt") || has("tokenizer.json")) {
        return Some("tokenizer/".into());
    }
    None
}

/// Fetch the files generation reads into the hub cache and return the snapshot folder.
fn download(cache: &Path, repo: &str, revision: &str, show_progress: bool) -> Result<PathBuf> {
    let api = hub_api(cache, repo, revision, show_progress)?;
    let index = fetch(&api, "model_index.json")?.with_context(|| {
        format!("{repo}@{revision} has no model_index.json: is it a diffusers model?")
    })?;
    let snapshot = index
        .parent()
        .context("the cache returned a file without a folder")?
        .to_path_buf();
    let listed: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
        .with_context(|| format!("{repo}: model_index.json is not valid JSON"))?;
    for (dir, stems) in COMPONENTS {
        if listed.get(dir).is_none() && dir == "vae" {
            continue;
        }
        fetch(&api, &format!("{dir}/config.json"))?
            .with_context(|| format!("{repo}@{revision} has no {dir}/config.json"))?;
        fetch_weights(&api, dir, stems).with_context(|| format!("{repo}@{revision}: {dir}/"))?;
    }
    for file in TOKENIZER_FILES {
        fetch(&api, &format!("tokenizer/{file}"))?;
    }
    fetch(&api, "scheduler/scheduler_config.json")?;
    if let Some(file) = missing_file(&snapshot) {
        bail!("{repo}@{revision} has no {file}");
    }
    Ok(snapshot)
}

/// A client for `repo` at `revision`, caching into `cache`.
fn hub_api(cache: &Path, repo: &str, revision: &str, show_progress: bool) -> Result<ApiRepo> {
    // hf-hub links snapshots to blobs by relative paths computed from absolute ones.
    let cache = std::path::absolute(cache)?;
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache)
        .with_endpoint(endpoint())
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .with_progress(show_progress)
        .build()?;
    Ok(api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    )))
}

/// `<stem>.safetensors`, or the shards its index lists, for the first stem the repository has.
fn fetch_weights(api: &ApiRepo, dir: &str, stems: &[&str]) -> Result<()> {
    for stem in stems {
        if fetch(api, &format!("{dir}/{stem}.safetensors"))?.is_some() {
            return Ok(());
        }
        if let Some(index) = fetch(api, &format!("{dir}/{stem}.safetensors.index.json"))? {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let shards: std::collections::BTreeSet<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .context("the index has no `weight_map`")?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            for shard in shards {
                let name = format!("{dir}/{shard}");
                if shard.contains("..") || fetch(api, &name)?.is_none() {
                    bail!("the index lists {shard}, which the repository does not have");
                }
            }
            return Ok(());
        }
    }
    let names: Vec<String> = stems.iter().map(|s| format!("{s}.safetensors")).collect();
    bail!(
        "no safetensors weights (looked for {}); convert .bin weights to safetensors first",
        names.join(", ")
    )
}

/// One file from the cache, downloading it if absent; `None` when the repository has no such file.
fn fetch(api: &ApiRepo, file: &str) -> Result<Option<PathBuf>> {
    match api.get(file) {
        Ok(path) => Ok(Some(path)),
        Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
        Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(401 | 403, _)) => {
            bail!("{file}: access refused ({e}); gated models need HF_TOKEN")
        }
        Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Transport(_)) => {
            // ureq's message repeats its source; one line names the URL and the cause.
            bail!("{file}: {e} (to work offline, pass the model folder's path)")
        }
        // The message alone: the error's source chain would repeat it.
        Err(e) => bail!("{file}: {e}"),
    }
}
