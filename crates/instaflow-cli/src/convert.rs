//! `instaflow convert`: a diffusers folder with its weights re-encoded (f16 for the browser).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use instaflow::sd::convert::{WeightDtype, convert_folder};

/// Target type of `--dtype`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// Half precision: half the download; what the browser loads best.
    F16,
    /// Single precision.
    F32,
}

/// Options of `instaflow convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The diffusers folder to read (e.g. RUN/model from `instaflow distill`).
    #[arg(long)]
    model: PathBuf,
    /// The new folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Floating-point type of the weights in the new folder.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    dtype: DtypeArg,
}

/// Run `instaflow convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let dtype = match args.dtype {
        DtypeArg::F16 => WeightDtype::F16,
        DtypeArg::F32 => WeightDtype::F32,
    };
    let report = convert_folder(&args.model, &args.out, dtype)
        .with_context(|| format!("converting {}", args.model.display()))?;
    for s in &report.skipped {
        crate::note!(
            "skipped {} (not safetensors; never read by instaflow)",
            s.display()
        );
    }
    println!(
        "wrote {}: {} weight file(s) {:.1} MB → {:.1} MB ({:?}), {} other file(s) copied",
        args.out.display(),
        report.weight_files,
        report.bytes_in as f64 / 1e6,
        report.bytes_out as f64 / 1e6,
        dtype,
        report.copied
    );
    Ok(())
}
