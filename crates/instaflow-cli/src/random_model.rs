//! `instaflow random-model`: a diffusers folder in the SD-1.5 architecture with random weights, for
//! trying loaders, the browser and benchmarks at full size without the published weights.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use burn::backend::Flex;
use clap::Args;
use instaflow::sd::models::random::{Init, PRESETS, save_random_model};
use instaflow::sd::tokenizer::ClipTokenizer;
use instaflow::training::data::write_atomic;

use crate::convert::DtypeArg;
use crate::embedded;

/// Options of `instaflow random-model`.
#[derive(Debug, Args)]
pub struct RandomModelArgs {
    /// `sd15`: SD-1.5's exact shapes (1.07 B parameters: 2.1 GB as f16, 4.3 GB as f32);
    /// `mini`: every SD-1.5 module type, narrow (for quick tests).
    #[arg(long, default_value = "sd15", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: String,
    /// The new folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Floating-point type of the weights.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    dtype: DtypeArg,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// All-zero weights, written as sparse files at once (for loader and download tests).
    #[arg(long)]
    zeros: bool,
    /// Write the tokenizer as one `tokenizer.json` instead of `vocab.json` + `merges.txt` (both
    /// forms are published; loaders must read either).
    #[arg(long)]
    tokenizer_json: bool,
}

/// Run `instaflow random-model` (on the CPU backend: initialising is cheap there).
pub fn run(args: RandomModelArgs) -> Result<()> {
    ensure!(
        !args.out.exists() || args.out.read_dir()?.next().is_none(),
        "--out {}: the folder exists and is not empty",
        args.out.display()
    );
    let half = matches!(args.dtype, DtypeArg::F16);
    save_random_model::<Flex>(
        &args.preset,
        &args.out,
        half,
        if args.zeros {
            Init::Zeros
        } else {
            Init::Random(args.seed)
        },
        &embedded::tokenizer(),
        &Default::default(),
    )
    .map_err(anyhow::Error::msg)?;
    if args.tokenizer_json {
        let dir = args.out.join("tokenizer");
        let json = ClipTokenizer::from_dir(&dir)?.to_tokenizer_json()?;
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        for file in ["vocab.json", "merges.txt"] {
            std::fs::remove_file(dir.join(file))?;
        }
    }
    println!(
        "wrote {} ({} preset, {} weights, {:?})",
        args.out.display(),
        args.preset,
        if args.zeros { "zero" } else { "random" },
        args.dtype
    );
    Ok(())
}
