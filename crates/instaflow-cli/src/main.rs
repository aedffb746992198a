//! `instaflow`: one-step text-to-image with InstaFlow — the command-line tool.

mod backend;
mod bench;
mod bench_sd;
mod generate;
mod plots;
mod toy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use backend::BackendChoice;

/// InstaFlow in Rust: rectified flow, reflow and one-step distillation on burn.
#[derive(Debug, Parser)]
#[command(name = "instaflow", version, about, long_about = None)]
struct Cli {
    /// Compute backend. `auto` picks CUDA, then a hardware wgpu adapter, then the CPU, and says
    /// which it chose.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, global = true)]
    backend: BackendChoice,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a text prompt with a diffusers-format InstaFlow model.
    Generate(generate::GenerateArgs),
    /// The paper's Figure 4 at 2-D scale: train 1-RF on a label-conditioned mixture, reflow it into
    /// 2-RF, distill both into one-step generators; print a table and write PNG figures.
    Toy(toy::ToyArgs),
    /// Time the text encoder, UNet and VAE decoder at SD-1.5 size (random weights).
    Bench(bench_sd::BenchSdArgs),
    /// Time a convolution, a matmul and attention (SD-1.5 shapes) on each backend that works here.
    BenchBackends(bench::BenchArgs),
    /// List the compute backends and whether each works on this machine.
    Backends,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(cli.backend, args),
        Command::Toy(args) => toy::run(cli.backend, args),
        Command::Bench(args) => bench_sd::run(cli.backend, args),
        Command::BenchBackends(args) => bench::run(args),
        Command::Backends => bench::list(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
