//! `xtask build-web`: the wasm crate → `web/pkg/` through a wasm-bindgen CLI pinned to Cargo.lock.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The version of `package` recorded in a Cargo.lock text.
pub fn locked_version(lock: &str, package: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            let version = lines.next()?.trim();
            return version
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_string);
        }
    }
    None
}

/// Run `cmd`, failing with its name when it cannot start or exits non-zero.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// `wasm-bindgen --version` of `bin`, if it runs.
fn bindgen_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().nth(1).map(str::to_string)
}

/// A wasm-bindgen CLI of exactly `version`: on PATH, in `target/tools`, or built there from
/// crates.io (the generated glue must match the `wasm-bindgen` crate the wasm was built with).
fn wasm_bindgen_cli(root: &Path, version: &str) -> Result<PathBuf> {
    let on_path = PathBuf::from("wasm-bindgen");
    if bindgen_version(&on_path).as_deref() == Some(version) {
        return Ok(on_path);
    }
    let tools = root.join("target/tools");
    let local = tools.join("bin/wasm-bindgen");
    if bindgen_version(&local).as_deref() == Some(version) {
        return Ok(local);
    }
    eprintln!(
        "installing wasm-bindgen-cli {version} from crates.io into {}",
        tools.display()
    );
    // Not `--locked`: the CLI's own lock file names a webpki-roots release that crates.io no
    // longer serves; `--version` pins the CLI itself, which is what must match.
    run(Command::new(env!("CARGO"))
        .args([
            "install",
            "wasm-bindgen-cli",
            "--version",
            version,
            "--root",
        ])
        .arg(&tools))?;
    Ok(local)
}

/// Build `web/pkg/` (wasm module + JS glue) from `crates/instaflow-wasm`.
pub fn build_web(root: &Path) -> Result<()> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let version =
        locked_version(&lock, "wasm-bindgen").context("Cargo.lock has no wasm-bindgen package")?;
    let bindgen = wasm_bindgen_cli(root, &version)?;
    eprintln!("building instaflow-wasm for wasm32 (release)");
    run(Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-unknown-unknown",
        ])
        .args(["-p", "instaflow-wasm"]))?;
    let wasm = root.join("target/wasm32-unknown-unknown/release/instaflow_wasm.wasm");
    let out = root.join("web/pkg");
    run(Command::new(&bindgen)
        .args(["--target", "web", "--out-name", "instaflow_wasm"])
        // Symbol names only serve stack traces; panic messages are reported separately.
        .args([
            "--remove-name-section",
            "--remove-producers-section",
            "--out-dir",
        ])
        .arg(&out)
        .arg(&wasm))?;
    let size = std::fs::metadata(out.join("instaflow_wasm_bg.wasm"))?.len();
    eprintln!("wrote {} ({:.1} MB wasm)", out.display(), size as f64 / 1e6);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_locked_version() {
        let lock = "[[package]]\nname = \"wasm-bindgen-futures\"\nversion = \"0.4.1\"\n\n\
                    [[package]]\nname = \"wasm-bindgen\"\nversion = \"0.2.130\"\n";
        assert_eq!(
            locked_version(lock, "wasm-bindgen").as_deref(),
            Some("0.2.130")
        );
        assert_eq!(locked_version(lock, "serde"), None);
    }
}
