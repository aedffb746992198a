//! `xtask serve`: a static file server for the page, the npm package and the shipped models.
//!
//! A few lines over `tiny_http` rather than a dependency on Node or Python: the page must come up
//! on a machine that has only the Rust toolchain. It binds to loopback only (WebGPU needs a secure
//! context, which `localhost`/`127.0.0.1` is).

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use tiny_http::{Header, Response, Server};

/// Options of `xtask serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Port on 127.0.0.1 (0: any free port; the URL is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Serve what is there without building the package first.
    #[arg(long)]
    no_build: bool,
    /// Extra or replacing mounts `URL_PREFIX=FOLDER` (e.g. `/my-model=/data/InstaFlow-0.9B`).
    /// Without any, `/`=www, `/instaflow`=web, `/models`=models.
    #[arg(long = "mount", value_name = "PREFIX=FOLDER")]
    mounts: Vec<String>,
}

/// URL prefix → folder, longest prefix first.
#[derive(Debug, Clone)]
pub struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    /// Parse `PREFIX=FOLDER` specs; every folder must exist.
    pub fn parse(specs: &[String], root: &Path) -> Result<Self> {
        let mut mounts = Vec::new();
        for spec in specs {
            let (prefix, dir) = spec
                .split_once('=')
                .ok_or_else(|| anyhow!("--mount {spec}: expected PREFIX=FOLDER"))?;
            let dir = root.join(dir);
            ensure!(
                dir.is_dir(),
                "--mount {spec}: {} is not a folder",
                dir.display()
            );
            let prefix = format!("/{}", prefix.trim_matches('/'));
            mounts.push((prefix, dir));
        }
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self(mounts))
    }

    /// The file a request path maps to, or `None` (outside every mount, or `..` in it).
    pub fn resolve(&self, url_path: &str) -> Option<PathBuf> {
        let path = url_path.split(['?', '#']).next().unwrap_or("");
        let path = percent_decode(path)?;
        for (prefix, dir) in &self.0 {
            let rest = if prefix == "/" {
                Some(path.as_str())
            } else {
                path.strip_prefix(prefix.as_str())
                    .filter(|r| r.is_empty() || r.starts_with('/'))
            };
            let Some(rest) = rest else { continue };
            let rel = Path::new(rest.trim_start_matches('/'));
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return None;
            }
            let mut file = dir.join(rel);
            if file.is_dir() {
                file = file.join("index.html");
            }
            return Some(file);
        }
        None
    }
}

/// Decode `%xx` escapes (file names with spaces); `None` for malformed or non-UTF-8 paths.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Content-Type of a file by its extension (`.wasm` must be `application/wasm` for streaming
/// compilation, `.js` a JavaScript type for module scripts).
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "txt" | "md" => "text/plain; charset=utf-8",
        "ts" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

/// Build (unless `--no-build`) and serve until interrupted.
pub fn run(root: &Path, args: ServeArgs) -> Result<()> {
    if !args.no_build {
        crate::build::build_web(root)?;
    }
    let specs = if args.mounts.is_empty() {
        vec![
            "/=www".into(),
            "/instaflow=web".into(),
            "/models=models".into(),
        ]
    } else {
        args.mounts.clone()
    };
    let mounts = Arc::new(Mounts::parse(&specs, root)?);
    if args.mounts.is_empty() && !root.join("web/pkg/instaflow_wasm_bg.wasm").is_file() {
        bail!(
            "web/pkg is not built: run without --no-build (or `cargo run -p xtask -- build-web`)"
        );
    }
    let server = Server::http(("127.0.0.1", args.port))
        .map_err(|e| anyhow!("cannot listen on 127.0.0.1:{}: {e}", args.port))?;
    let port = server
        .server_addr()
        .to_ip()
        .context("listening address")?
        .port();
    // The exact line tests wait for.
    println!("serving http://127.0.0.1:{port}/");
    // One thread per request: a slow client of a large file never holds up the small ones.
    for request in server.incoming_requests() {
        let mounts = mounts.clone();
        std::thread::spawn(move || respond(request, &mounts));
    }
    Ok(())
}

fn respond(request: tiny_http::Request, mounts: &Mounts) {
    let file = mounts
        .resolve(request.url())
        .and_then(|path| File::open(&path).ok().map(|f| (path, f)));
    let result = match file {
        Some((path, f)) => request.respond(
            Response::from_file(f)
                .with_header(header("Content-Type", content_type(&path)))
                .with_header(header("Cache-Control", "no-cache")),
        ),
        None => request.respond(
            Response::from_string("not found")
                .with_status_code(404)
                .with_header(header("Content-Type", "text/plain; charset=utf-8")),
        ),
    };
    // A client that went away mid-response is not the server's problem.
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_urls_to_files_and_refuses_escapes() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let m = Mounts::parse(&["/=www".into(), "/models=models".into()], &root).unwrap();
        assert_eq!(
            m.resolve("/models/instaflow-emoji/unet/config.json?x=1"),
            Some(root.join("models/instaflow-emoji/unet/config.json"))
        );
        assert_eq!(m.resolve("/"), Some(root.join("www/index.html")));
        assert_eq!(m.resolve("/models/../Cargo.toml"), None);
        assert_eq!(m.resolve("/%2e%2e/Cargo.toml"), None);
        assert_eq!(m.resolve("/modelsX/a"), Some(root.join("www/modelsX/a")));
        assert!(Mounts::parse(&["/=no-such-folder".into()], &root).is_err());
        assert!(Mounts::parse(&["www".into()], &root).is_err());
    }

    #[test]
    fn wasm_and_modules_get_their_types() {
        assert_eq!(content_type(Path::new("a/x.wasm")), "application/wasm");
        assert!(content_type(Path::new("x.js")).starts_with("text/javascript"));
        assert_eq!(
            content_type(Path::new("m.safetensors")),
            "application/octet-stream"
        );
    }
}
