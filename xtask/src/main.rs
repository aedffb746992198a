//! Project tasks that are not part of the `instaflow` tool: building the npm package in `web/`
//! from the wasm crate, and serving the web page in `www/` on localhost.
//!
//! `cargo run -p xtask -- serve` is the one command that builds what the page needs and serves it.

mod build;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build and serve the browser side of instaflow.
#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the npm package in `web/`: compile `instaflow-wasm` for wasm32 (release) and run the
    /// wasm-bindgen CLI of exactly the version in Cargo.lock (installed from crates.io into
    /// `target/tools` when missing), writing `web/pkg/`.
    BuildWeb,
    /// Build the package (unless --no-build) and serve the page: `/` is `www/`, `/instaflow/` the
    /// npm package `web/`, `/models/` the models shipped in `models/`.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildWeb => build::build_web(&repo_root()),
        Command::Serve(args) => serve::run(&repo_root(), args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (this crate lives in `<root>/xtask`).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent folder")
        .to_path_buf()
}
