//! Mutation tests of every reader of files a user hands us: safetensors weights, config.json,
//! tokenizer files, noise files, reflow pair folders and data sets. Each target takes 10,000 inputs made by
//! mutating a valid one (bytes set, flipped, inserted, deleted, truncated; numbers swapped for
//! extreme ones) and must return `Ok` or `Err` — never panic, never hang, never hold more than
//! [`ALLOCATION_BOUND`] bytes at once. proptest keeps any
//! failing input in `proptest-regressions/` next to this file, replayed first on every run.

use std::path::Path;

use proptest::prelude::*;

use crate::sd::models::unet_2d::UNet2DConditionConfig;
use crate::sd::source::ModelSource;
use crate::test_util::{TB, device, repo_path};

/// Inputs per target.
const CASES: u32 = 10_000;

/// Most bytes one input may make a reader hold allocated at once (counted on the reading
/// thread). The valid seeds need at most a few MB (the largest, a 0.8 MB UNet checkpoint, loads
/// into its model); a reader that trusted a size written in a file would need far more.
const ALLOCATION_BOUND: usize = 64 << 20;

thread_local! {
    /// The most one input of this thread's target has allocated at once.
    static MOST_ALLOCATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Say how close this thread's target came to the bound (`cargo test -- --nocapture`).
fn report(target: &str) {
    let most = MOST_ALLOCATED.with(std::cell::Cell::get);
    eprintln!(
        "{target}: at most {} KiB allocated at once for one input",
        most >> 10
    );
}

/// Run one input's checks, failing it when they allocated more than [`ALLOCATION_BOUND`].
fn bounded(case: impl FnOnce() -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    let (result, peak) = crate::test_util::peak_allocation(case);
    MOST_ALLOCATED.with(|m| m.set(m.get().max(peak)));
    prop_assert!(
        peak <= ALLOCATION_BOUND,
        "{peak} bytes allocated at once for one input (bound {ALLOCATION_BOUND})"
    );
    result
}

/// Values that break careless readers when they replace a number or a token.
const EXTREMES: [&str; 10] = [
    "0",
    "-1",
    "1e308",
    "4294967296",
    "18446744073709551615",
    "99999999999999999999",
    "null",
    "[]",
    "\"x\"",
    "NaN",
];

/// Apply edits `(kind, position, byte)` to `seed`.
fn mutate(seed: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(kind, at, byte) in edits {
        let i = if b.is_empty() { 0 } else { at % b.len() };
        match kind % 6 {
            0 if !b.is_empty() => b[i] = byte,
            1 if !b.is_empty() => b[i] ^= 1 << (byte % 8),
            2 => b.insert(i, byte),
            3 if !b.is_empty() => {
                b.remove(i);
            }
            4 if byte < 16 => b.truncate(i),
            _ => {
                // Replace the run of digits at or after i with an extreme value.
                if let Some(start) = b[i..].iter().position(u8::is_ascii_digit).map(|p| p + i) {
                    let end = b[start..]
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .map_or(b.len(), |p| p + start);
                    let with = EXTREMES[byte as usize % EXTREMES.len()].as_bytes();
                    b.splice(start..end, with.iter().copied());
                }
            }
        }
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec(any::<(u8, usize, u8)>(), 1..6)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("instaflow-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, files: &[(&str, &[u8])]) {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn safetensors_weights() {
    let file = "unet/diffusion_pytorch_model.safetensors";
    let fixture = repo_path("tests/fixtures/parity/conv-f32");
    let seed = std::fs::read(fixture.join(file)).unwrap();
    let cfg = std::fs::read(fixture.join("unet/config.json")).unwrap();
    let unet_cfg: UNet2DConditionConfig = serde_json::from_slice(&cfg).unwrap();
    // Mutations near the header are the interesting ones; the data are plain floats.
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    proptest!(config(), |(edits in edits(), deep in any::<bool>())| {
        bounded(|| -> Result<(), TestCaseError> {
            let edits: Vec<_> = edits
                .into_iter()
                .map(|(k, at, b)| (k, if deep { at } else { at % header }, b))
                .collect();
            let bytes = mutate(&seed, &edits);
            let source = ModelSource::Memory {
                name: "fuzz".into(),
                files: [(file.to_string(), bytes)].into(),
            };
            if crate::sd::weights::stream::read_header_from(&source, file).is_ok() {
                let mut unet = unet_cfg.init::<TB>(&device()).unwrap();
                let files = [crate::sd::weights::WeightFile(file.into())];
                let _ = crate::sd::weights::load(&mut unet, &source, &files, &[], &device());
            }
            Ok(())
        })?;
    });
    report("safetensors_weights");
}

#[test]
fn unet_config_json() {
    let seed = std::fs::read(repo_path("tests/fixtures/parity/conv-f32/unet/config.json")).unwrap();
    let (runs, parsed) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    proptest!(config(), |(edits in edits())| {
        bounded(|| -> Result<(), TestCaseError> {
            runs.set(runs.get() + 1);
            let bytes = mutate(&seed, &edits);
            if let Ok(cfg) = serde_json::from_slice::<UNet2DConditionConfig>(&bytes) {
                parsed.set(parsed.get() + 1);
                // Building is lazy: no weight is allocated, whatever the sizes say.
                let _ = cfg.init::<TB>(&device());
                let _ = cfg.latent_size();
            }
            Ok(())
        })?;
    });
    report("unet_config_json");
    // Every input ran (plus the failures kept in proptest-regressions, replayed first for every
    // target of this file), and mutations kept enough configs valid to reach the model builder.
    assert!(runs.get() >= CASES, "{} runs", runs.get());
    assert!(parsed.get() > CASES / 20, "{} parsed", parsed.get());
}

#[test]
fn tokenizer_files() {
    // A small BPE vocabulary in CLIP's format (byte tokens, `</w>` word ends, two merges).
    let mut vocab: Vec<String> = (b'a'..=b'z').map(|c| (c as char).to_string()).collect();
    vocab.extend((b'a'..=b'z').map(|c| format!("{}</w>", c as char)));
    vocab.extend(["re", "red</w>", "<|startoftext|>", "<|endoftext|>"].map(String::from));
    let vocab_json = serde_json::to_vec(
        &vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .unwrap();
    let merges = b"#version: 0.2\nr e\nre d</w>\n".to_vec();
    proptest!(config(), |(edits in edits(), which in any::<bool>())| {
        bounded(|| -> Result<(), TestCaseError> {
            let (v, m) = if which {
                (mutate(&vocab_json, &edits), merges.clone())
            } else {
                (vocab_json.clone(), mutate(&merges, &edits))
            };
            let (Ok(v), Ok(m)) = (String::from_utf8(v), String::from_utf8(m)) else {
                return Ok(());
            };
            if let Ok(tok) = crate::sd::tokenizer::ClipTokenizer::from_vocab_merges(&v, &m, None) {
                let _ = tok.encode("red heart");
            }
            Ok(())
        })?;
    });
    report("tokenizer_files");
}

#[test]
fn noise_files() {
    let values: Vec<u8> = (0..2 * 4 * 2 * 2)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4, 2, 2], &values)
            .unwrap();
    let seed = safetensors::serialize([("noise", view)], None).unwrap();
    assert!(crate::flow::noise::from_safetensors(&seed, 4).is_ok());
    proptest!(config(), |(edits in edits())| {
        bounded(|| -> Result<(), TestCaseError> {
            if let Ok((shape, values)) = crate::flow::noise::from_safetensors(&mutate(&seed, &edits), 4) {
                prop_assert_eq!(shape.iter().product::<usize>(), values.len());
                prop_assert!(values.iter().all(|v| v.is_finite()));
            }
            Ok(())
        })?;
    });
    report("noise_files");
}

#[test]
fn reflow_pair_folders() {
    let dir = temp("pairs");
    let plan = crate::training::reflow::PairPlan {
        prompts: vec!["red heart".into(), "blue star".into()],
        total: 2,
        seed: 1,
        shape: [1, 2, 2],
        chunk: 2,
        teacher: "t".into(),
        solver: "euler:1".into(),
        guidance: 1.0,
    };
    plan.create_or_check(&dir).unwrap();
    let chunk = crate::training::reflow::chunk_path(&dir, 0, 1, 0);
    std::fs::create_dir_all(chunk.parent().unwrap()).unwrap();
    crate::training::reflow::write_chunk(&chunk, &plan, &[0, 1], &[0.5; 8], &[0.25; 8]).unwrap();
    let plan_seed = std::fs::read(dir.join("pairs.json")).unwrap();
    let chunk_seed = std::fs::read(&chunk).unwrap();
    assert!(crate::training::reflow::PairSet::load(&dir).is_ok());
    proptest!(config(), |(edits in edits(), which in any::<bool>())| {
        bounded(|| -> Result<(), TestCaseError> {
            if which {
                write(&dir, &[("pairs.json", &mutate(&plan_seed, &edits))]);
                std::fs::write(&chunk, &chunk_seed).unwrap();
            } else {
                write(&dir, &[("pairs.json", &plan_seed)]);
                std::fs::write(&chunk, mutate(&chunk_seed, &edits)).unwrap();
            }
            let _ = crate::training::reflow::census(&dir);
            let _ = crate::training::reflow::PairSet::load(&dir);
            Ok(())
        })?;
    });
    report("reflow_pair_folders");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_text_data_sets() {
    let dir = temp("data");
    let data = crate::training::data::ImageTextDataset {
        name: "fuzz".into(),
        source: "test".into(),
        licence: "none".into(),
        channels: 1,
        height: 2,
        width: 2,
        images: vec![0, 64, 128, 255, 1, 2, 3, 4],
        classes: vec!["zero".into(), "one".into()],
        attributes: vec![],
        items: vec![
            crate::training::data::Item {
                label: Some(0),
                captions: vec!["a zero".into()],
            },
            crate::training::data::Item {
                label: Some(1),
                captions: vec!["a one".into()],
            },
        ],
    };
    data.save(&dir).unwrap();
    let manifest = std::fs::read(dir.join("dataset.json")).unwrap();
    let images = std::fs::read(dir.join("images.safetensors")).unwrap();
    proptest!(config(), |(edits in edits(), which in any::<bool>())| {
        bounded(|| -> Result<(), TestCaseError> {
            let (m, i) = if which {
                (mutate(&manifest, &edits), images.clone())
            } else {
                (manifest.clone(), mutate(&images, &edits))
            };
            write(&dir, &[("dataset.json", &m), ("images.safetensors", &i)]);
            if let Ok(d) = crate::training::data::ImageTextDataset::load(&dir) {
                // A loaded set must be usable: every item's pixels and captions reachable.
                let _ = d.all_captions();
                if !d.is_empty() {
                    let _ = d.pixels::<TB>(&[d.len() - 1], &device());
                }
            }
            Ok(())
        })?;
    });
    report("image_text_data_sets");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_allocation_count_sees_a_large_allocation() {
    let (v, peak) = crate::test_util::peak_allocation(|| vec![1u8; 80 << 20]);
    assert!(peak >= 80 << 20, "{peak}");
    drop(v);
    let ((), small) = crate::test_util::peak_allocation(|| drop(vec![1u8; 1 << 10]));
    assert!(small < 64 << 10, "{small}");
    let failed = bounded(|| {
        drop(vec![1u8; 80 << 20]);
        Ok(())
    });
    assert!(failed.is_err());
}
