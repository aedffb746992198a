//! `xtask serve`: a static file server for the page, the npm package and the shipped models.
//!
//! Written over `std::net` rather than a dependency on Node or Python, since the page must come up
//! on a machine that has only the Rust toolchain; and rather than `tiny_http`, which here
//! intermittently never delivered responses to a browser's parallel requests (the requests arrived,
//! the responses did not). One thread per connection, one request per connection (`Connection:
//! close`): GET and HEAD of static files is all it does. It binds to loopback only (WebGPU needs a
//! secure context, which `localhost`/`127.0.0.1` is).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;

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
    let listener = TcpListener::bind(("127.0.0.1", args.port))
        .map_err(|e| anyhow!("cannot listen on 127.0.0.1:{}: {e}", args.port))?;
    let port = listener.local_addr().context("listening address")?.port();
    // The exact line tests wait for.
    println!("serving http://127.0.0.1:{port}/");
    serve_forever(listener, mounts);
    Ok(())
}

/// Answer every connection on `listener` in its own thread.
pub fn serve_forever(listener: TcpListener, mounts: Arc<Mounts>) {
    for stream in listener.incoming().flatten() {
        let mounts = mounts.clone();
        std::thread::spawn(move || {
            // A client that goes away mid-response is not the server's problem.
            let _ = handle(stream, &mounts);
        });
    }
}

/// Read one request from `stream` and answer it.
fn handle(mut stream: TcpStream, mounts: &Mounts) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return reply(&mut stream, "405 Method Not Allowed", "text/plain", None);
    }
    match mounts
        .resolve(target)
        .and_then(|path| File::open(&path).ok().map(|f| (path, f)))
    {
        Some((path, file)) => reply(
            &mut stream,
            "200 OK",
            content_type(&path),
            (method == "GET").then_some(file),
        ),
        None => reply(&mut stream, "404 Not Found", "text/plain", None),
    }
}

fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    file: Option<File>,
) -> io::Result<()> {
    let length = match &file {
        Some(f) => f.metadata()?.len(),
        None => 0,
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    )?;
    if let Some(mut f) = file {
        io::copy(&mut f, stream)?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
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

    fn get(port: u16, path: &str) -> String {
        use std::io::Read;
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_files_with_length_and_type_and_404s_the_rest() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mounts = Arc::new(Mounts::parse(&["/m=models".into()], &root).unwrap());
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || serve_forever(listener, mounts));
        let body =
            std::fs::read_to_string(root.join("models/instaflow-emoji/unet/config.json")).unwrap();
        let answers: Vec<_> = (0..16)
            .map(|_| std::thread::spawn(move || get(port, "/m/instaflow-emoji/unet/config.json")))
            .collect();
        for a in answers {
            let text = a.join().unwrap();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.contains("Content-Type: application/json\r\n"));
            assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
            assert!(text.ends_with(&body));
        }
        assert!(get(port, "/m/nothing-here").starts_with("HTTP/1.1 404"));
        assert!(get(port, "/m/../Cargo.toml").starts_with("HTTP/1.1 404"));
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
