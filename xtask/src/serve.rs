//! `xtask serve`: a static file server for the page, the npm package and the shipped models.
//!
//! Written over `std::net` rather than a dependency on Node or Python, since the page must come up
//! on a machine that has only the Rust toolchain; and rather than `tiny_http`, which here
//! intermittently never delivered responses to a browser's parallel requests (the requests arrived,
//! the responses did not). One thread per connection, one request per connection (`Connection:
//! close`): GET and HEAD of static files, with single byte ranges (206), ETags and CORS headers as
//! a model host such as the Hugging Face Hub sends them, so the browser's streaming loader can be
//! tried against it. `GET /__stats` reports the body bytes served so far (what the cache tests
//! count). It binds to loopback only (WebGPU needs a secure context, which `localhost`/`127.0.0.1` is).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Answer Range requests with the whole file (as some static hosts do), to try the loader's
    /// fallback.
    #[arg(long)]
    no_range: bool,
    /// Print every request (method, path, range, bytes sent) to stderr.
    #[arg(long)]
    log: bool,
    /// Send whole files gzip-compressed (`Content-Encoding: gzip`, `Content-Length` of the
    /// compressed body, HEAD too), as compressing servers and CDNs do; byte ranges stay plain.
    #[arg(long)]
    gzip: bool,
}

/// What the server serves and how.
#[derive(Debug)]
pub struct Server {
    /// URL prefixes and their folders.
    pub mounts: Mounts,
    /// Whether byte ranges are honoured.
    pub ranges: bool,
    /// Body bytes sent so far.
    pub bytes: AtomicU64,
    /// Requests answered so far.
    pub requests: AtomicU64,
    /// Print every request to stderr.
    pub log: bool,
    /// Compress whole-file responses with gzip.
    pub gzip: bool,
}

impl Server {
    /// A server of `mounts`.
    pub fn new(mounts: Mounts, ranges: bool) -> Self {
        Self {
            mounts,
            ranges,
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            log: false,
            gzip: false,
        }
    }
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
    let mut server = Server::new(Mounts::parse(&specs, root)?, !args.no_range);
    server.log = args.log;
    server.gzip = args.gzip;
    let server = Arc::new(server);
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
    serve_forever(listener, server);
    Ok(())
}

/// Answer every connection on `listener` in its own thread.
pub fn serve_forever(listener: TcpListener, server: Arc<Server>) {
    for stream in listener.incoming().flatten() {
        let server = server.clone();
        std::thread::spawn(move || {
            // A client that goes away mid-response is not the server's problem.
            let _ = handle(stream, &server);
        });
    }
}

/// A parsed `Range: bytes=a-b` header (one range; `b` may be open).
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multipart ranges: answer with the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.saturating_sub(1)),
        ),
    };
    Some(if range.0 <= range.1 && range.1 < len {
        Ok(range)
    } else {
        Err(())
    })
}

/// Read one request from `stream` and answer it.
fn handle(mut stream: TcpStream, server: &Server) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    server.requests.fetch_add(1, Ordering::Relaxed);
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut head = Head::new();
    if method == "OPTIONS" {
        head.status = "204 No Content";
        head.extra.push((
            "Access-Control-Allow-Headers",
            "Range, If-None-Match".to_string(),
        ));
        head.extra
            .push(("Access-Control-Allow-Methods", "GET, HEAD".to_string()));
        return head.send(&mut stream, None, server, false);
    }
    if method != "GET" && method != "HEAD" {
        head.status = "405 Method Not Allowed";
        return head.send(&mut stream, None, server, false);
    }
    if target.split('?').next() == Some("/__stats") {
        let body = format!(
            "{{\"bytes\":{},\"requests\":{}}}",
            server.bytes.load(Ordering::Relaxed),
            server.requests.load(Ordering::Relaxed)
        );
        head.content_type = "application/json";
        head.length = body.len() as u64;
        return head.send(&mut stream, Some(&mut body.as_bytes()), server, false);
    }
    let Some((path, mut file)) = server
        .mounts
        .resolve(target)
        .and_then(|path| File::open(&path).ok().map(|f| (path, f)))
    else {
        head.status = "404 Not Found";
        return head.send(&mut stream, None, server, false);
    };
    let meta = file.metadata()?;
    let len = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    head.content_type = content_type(&path);
    head.extra.push(("ETag", format!("\"{len:x}-{mtime:x}\"")));
    if server.ranges {
        head.extra.push(("Accept-Ranges", "bytes".to_string()));
    }
    let (start, end) = match range
        .as_deref()
        .filter(|_| server.ranges)
        .and_then(|r| parse_range(r, len))
    {
        Some(Ok((a, b))) => {
            head.status = "206 Partial Content";
            head.extra
                .push(("Content-Range", format!("bytes {a}-{b}/{len}")));
            (a, b + 1)
        }
        Some(Err(())) => {
            head.status = "416 Range Not Satisfiable";
            head.extra.push(("Content-Range", format!("bytes */{len}")));
            return head.send(&mut stream, None, server, false);
        }
        None => (0, len),
    };
    head.length = end - start;
    if server.gzip && !head.status.starts_with("206") {
        let mut whole = Vec::new();
        file.read_to_end(&mut whole)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&whole)?;
        let body = gz.finish()?;
        head.length = body.len() as u64;
        head.extra.push(("Content-Encoding", "gzip".to_string()));
        if method == "HEAD" {
            return head.send(&mut stream, None, server, false);
        }
        return head.send(&mut stream, Some(&mut body.as_slice()), server, true);
    }
    if server.log {
        eprintln!(
            "{method} {target} {} → {}",
            range.as_deref().unwrap_or("-"),
            head.length
        );
    }
    if method == "HEAD" {
        return head.send(&mut stream, None, server, false);
    }
    file.seek(SeekFrom::Start(start))?;
    head.send(&mut stream, Some(&mut file.take(end - start)), server, true)
}

/// A response's status line and headers.
struct Head {
    status: &'static str,
    content_type: &'static str,
    length: u64,
    extra: Vec<(&'static str, String)>,
}

impl Head {
    fn new() -> Self {
        Self {
            status: "200 OK",
            content_type: "text/plain",
            length: 0,
            extra: Vec::new(),
        }
    }

    /// Write the head, then `body` (counted in the server's statistics when `count`), and end the
    /// connection.
    fn send(
        &self,
        stream: &mut TcpStream,
        body: Option<&mut dyn Read>,
        server: &Server,
        count: bool,
    ) -> io::Result<()> {
        let Self {
            status,
            content_type,
            length,
            ..
        } = self;
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
             Cache-Control: no-cache\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n\
             Access-Control-Expose-Headers: Content-Length, Content-Range, ETag, Accept-Ranges\r\n"
        );
        for (name, value) in &self.extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        if let Some(body) = body {
            let sent = io::copy(body, stream)?;
            if count {
                server.bytes.fetch_add(sent, Ordering::Relaxed);
            }
        }
        stream.flush()?;
        stream.shutdown(std::net::Shutdown::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_urls_to_files_and_refuses_escapes() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let m = Mounts::parse(&["/=www".into(), "/models=models".into()], &root).unwrap();
        assert_eq!(
            m.resolve("/models/instaflow-shapes/unet/config.json?x=1"),
            Some(root.join("models/instaflow-shapes/unet/config.json"))
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
        let server = Arc::new(Server::new(
            Mounts::parse(&["/m=models".into()], &root).unwrap(),
            true,
        ));
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || serve_forever(listener, server));
        let body =
            std::fs::read_to_string(root.join("models/instaflow-shapes/unet/config.json")).unwrap();
        let answers: Vec<_> = (0..16)
            .map(|_| std::thread::spawn(move || get(port, "/m/instaflow-shapes/unet/config.json")))
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

    fn request(port: u16, head: &str) -> String {
        use std::io::Read;
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "{head}\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn start(ranges: bool) -> (u16, Arc<Server>) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let server = Arc::new(Server::new(
            Mounts::parse(&["/m=models".into()], &root).unwrap(),
            ranges,
        ));
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = server.clone();
        std::thread::spawn(move || serve_forever(listener, s));
        (port, server)
    }

    #[test]
    fn byte_ranges_etags_and_served_byte_counts() {
        let (port, server) = start(true);
        let file = "/m/instaflow-shapes/unet/config.json";
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let body =
            std::fs::read_to_string(root.join("models/instaflow-shapes/unet/config.json")).unwrap();
        let len = body.len();
        let r = request(port, &format!("GET {file} HTTP/1.1\r\nRange: bytes=2-5"));
        assert!(r.starts_with("HTTP/1.1 206 Partial Content\r\n"), "{r}");
        assert!(
            r.contains(&format!("Content-Range: bytes 2-5/{len}\r\n")),
            "{r}"
        );
        assert!(r.ends_with(&body[2..6]), "{r}");
        let r = request(port, &format!("GET {file} HTTP/1.1\r\nrange: bytes=10-"));
        assert!(r.ends_with(&body[10..]), "{r}");
        let r = request(port, &format!("GET {file} HTTP/1.1\r\nRange: bytes={len}-"));
        assert!(r.starts_with("HTTP/1.1 416"), "{r}");
        let before = server.bytes.load(Ordering::Relaxed);
        let r = request(port, &format!("HEAD {file} HTTP/1.1"));
        assert!(
            r.contains("ETag: \"") && r.contains("Accept-Ranges: bytes"),
            "{r}"
        );
        assert!(r.contains(&format!("Content-Length: {len}\r\n")) && r.ends_with("\r\n\r\n"));
        assert_eq!(
            server.bytes.load(Ordering::Relaxed),
            before,
            "HEAD sends no body"
        );
        let stats = request(port, "GET /__stats HTTP/1.1");
        assert!(
            stats.contains(&format!("\"bytes\":{}", 4 + len - 10)),
            "{stats}"
        );
    }

    #[test]
    fn without_ranges_the_whole_file_is_sent() {
        let (port, _) = start(false);
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let body =
            std::fs::read_to_string(root.join("models/instaflow-shapes/unet/config.json")).unwrap();
        let r = request(
            port,
            "GET /m/instaflow-shapes/unet/config.json HTTP/1.1\r\nRange: bytes=2-5",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(!r.contains("Accept-Ranges: bytes"), "{r}");
        assert!(r.ends_with(&format!("\r\n\r\n{body}")), "{r}");
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
