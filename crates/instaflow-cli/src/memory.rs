//! Memory limits: requests are checked against what they would allocate before anything is
//! allocated, and a device that runs out anyway ends the run with one message and exit code 3.

use std::fmt;

use anyhow::{Result, bail};
use instaflow::sd::pipeline::MemoryEstimate;

use crate::backend::Selected;

/// Exit code of a run that does not fit in memory or whose compute device failed.
pub const EXIT_OUT_OF_MEMORY: u8 = 3;

/// A request that needs more memory than the limit: main exits with [`EXIT_OUT_OF_MEMORY`].
#[derive(Debug)]
pub struct OutOfMemory(pub String);

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutOfMemory {}

/// Bytes in a human unit: "4.13 GB".
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match b {
        _ if b >= 1e15 => format!("{:.1} PB", b / 1e15),
        _ if b >= 1e12 => format!("{:.1} TB", b / 1e12),
        _ if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        _ if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        _ if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        _ => format!("{bytes} B"),
    }
}

/// `--max-memory`: bytes, or a number with K/M/G/T (powers of 1000; `KiB`, `MiB`, `GiB`, `TiB`
/// for powers of 1024), e.g. `8G`, `512MiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 8G, 512MiB, 1000000)"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "`{text}`: unknown unit `{u}` (use K, M, G, T, KiB … TiB)"
            ));
        }
    };
    let bytes = value * factor;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}`: the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable`), where known.
pub fn available_ram() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak resident memory of this process so far in bytes (Linux `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuse `request` (e.g. "--width 4096 --height 4096 --batch 8") when `estimate` does not fit:
/// the host must hold the noise, and on CPU backends the weights and activations too; a GPU's
/// share is checked against `max_memory` when given (its total is not known before allocating).
pub fn check(
    request: &str,
    estimate: &MemoryEstimate,
    selected: &Selected,
    max_memory: Option<u64>,
    half: bool,
) -> Result<()> {
    let on_cpu = matches!(selected, Selected::Cpu | Selected::Ndarray);
    let (limit, what) = match (max_memory, available_ram()) {
        (Some(m), _) => (Some(m), "--max-memory".to_string()),
        (None, Some(ram)) => (
            Some(ram),
            "available RAM; --max-memory sets another".to_string(),
        ),
        (None, None) => (None, String::new()),
    };
    let needed = if on_cpu || max_memory.is_some() {
        estimate.device().saturating_add(estimate.noise)
    } else {
        estimate.noise
    };
    if let Some(limit) = limit
        && needed > limit
    {
        let device = if on_cpu { "" } else { " on the device" };
        bail!(OutOfMemory(format!(
            "{request}: needs at least {} ({} of weights + {} of activations{device}, {} of \
             noise); the limit is {} ({what}). Use a smaller size or batch{}",
            human(needed),
            human(estimate.weights),
            human(estimate.activations),
            human(estimate.noise),
            human(limit),
            if on_cpu || half {
                ""
            } else {
                ", or --precision f16"
            },
        )));
    }
    Ok(())
}

/// A panic of a compute backend's thread (burn's GPU servers run on their own threads, and an
/// allocation failure there would leave the main thread waiting forever) ends the process with
/// one message and [`EXIT_OUT_OF_MEMORY`]. Panics of the main thread keep Rust's default report.
pub fn exit_on_device_failure() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        let message = message.lines().next().unwrap_or_default();
        let thread = std::thread::current();
        let main = thread.name() == Some("main");
        let oom = ["allocate", "out of memory", "OutOfMemory"]
            .iter()
            .any(|m| message.contains(m));
        if main && !oom {
            return default(info);
        }
        // `train --nodes`: the tensor and sync connections between machines panic in their
        // threads when a machine goes away.
        let network = [
            "websocket",
            "WebSocket",
            "connect",
            "connection",
            "PeerLost",
        ]
        .iter()
        .any(|m| message.contains(m));
        if network && !oom {
            eprintln!(
                "error: the connection to another machine of the run was lost ({message}); the \
                 last checkpoint is kept"
            );
            exit_now(1);
        }
        let what = if oom {
            "the compute device ran out of memory"
        } else {
            "the compute device failed"
        };
        eprintln!(
            "error: {what} ({message}). Try a smaller --width/--height or --batch, \
             --precision f16 on a GPU, or --backend cpu"
        );
        exit_now(EXIT_OUT_OF_MEMORY.into());
    }));
}

/// Ends the process at once with `code`, from any thread. `std::process::exit` would run the C
/// library's exit handlers, which tear down the GPU driver (Mesa's software Vulkan, LLVM) while
/// its threads and the waiting main thread still use it: on some machines that crashed the
/// process after the message, so the caller saw a signal instead of the exit code. Nothing is
/// lost by skipping the handlers: stderr is unbuffered, stdout flushes whole lines, and
/// checkpoints are written to a temporary name and renamed.
pub fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: `_exit` only ends the process; it touches no Rust state.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_size("8G"), Ok(8_000_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5gb"), Ok(1_500_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in ["", "G", "8X", "0", "-1G", "1e30T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
