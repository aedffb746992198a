//! `instaflow bench-backends` and `instaflow backends`.

use anyhow::Result;
use clap::Args;
use instaflow::bench::{BlockShape, BlockTimings, time_block};

use crate::backend::{Selected, cuda_works, wgpu_adapter};
use crate::with_backend;

/// Options of `instaflow bench-backends`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Timed runs per kernel (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Every backend that works on this machine.
fn available() -> Vec<Selected> {
    let mut list = vec![Selected::Cpu, Selected::Ndarray];
    if wgpu_adapter().is_some() {
        list.push(Selected::Wgpu(Default::default()));
    }
    #[cfg(feature = "cuda")]
    if cuda_works() {
        list.push(Selected::Cuda(Default::default()));
    }
    list
}

/// Run `instaflow bench-backends`.
pub fn run(args: BenchArgs) -> Result<()> {
    let shape = BlockShape::default();
    let mut results: Vec<(&str, BlockTimings)> = Vec::new();
    for sel in available() {
        crate::note!("timing {} …", sel.name());
        let t = with_backend!(&sel, B, device => time_block::<B>(&device, shape, args.repeats));
        results.push((sel.name(), t));
    }
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|(n, t)| serde_json::json!({"backend": n, "conv_ms": t.conv_ms, "matmul_ms": t.matmul_ms, "attention_ms": t.attention_ms}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"shape": format!("{shape:?}"), "results": rows})
            )?
        );
        return Ok(());
    }
    println!(
        "conv 3×3 {c}→{c} on {s}×{s}; matmul [{}, {c}]×[{c}, {c}]; attention {} heads × {} tokens × {} dims",
        shape.size * shape.size,
        shape.heads,
        shape.seq,
        shape.head_dim,
        c = shape.channels,
        s = shape.size
    );
    println!(
        "| backend | conv ms | matmul ms | attention ms | total ms |\n|---|---:|---:|---:|---:|"
    );
    for (n, t) in &results {
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} |",
            t.conv_ms,
            t.matmul_ms,
            t.attention_ms,
            t.total_ms()
        );
    }
    Ok(())
}

/// Run `instaflow backends`.
pub fn list() -> Result<()> {
    println!("cpu      yes (flex: SIMD + threads)");
    println!("ndarray  yes");
    match wgpu_adapter() {
        Some(a) => println!(
            "wgpu     yes: {} ({:?}, {:?}; f16 shaders: {})",
            a.name,
            a.kind,
            a.api,
            if a.shader_f16 { "yes" } else { "no" }
        ),
        None => println!("wgpu     no adapter found"),
    }
    let cuda = if !cfg!(feature = "cuda") {
        "not compiled in (build with `-p instaflow-cli --features cuda`)"
    } else if cuda_works() {
        "yes"
    } else {
        "no usable device (driver/NVRTC not found)"
    };
    println!("cuda     {cuda}");
    Ok(())
}
