//! Shared by the serve tests: finding SmolLM2, starting a server in-process, and a minimal
//! HTTP/1.1 client (no client crate needed for a handful of requests).
#![allow(dead_code)]

use anneal_runtime::gguf::Q41Policy;
use anneal_runtime::serve::{Args, serve_on};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The SmolLM2 GGUF: `ANNEAL_SMOLLM2_GGUF`, else the cache, else fetched by the project's script.
pub fn smollm2() -> PathBuf {
    fetched("ANNEAL_SMOLLM2_GGUF", "fetch-smollm2.sh")
}

/// The all-MiniLM-L6-v2 directory: `ANNEAL_MINILM_DIR`, else the cache, else fetched by the
/// project's script.
pub fn minilm() -> PathBuf {
    fetched("ANNEAL_MINILM_DIR", "fetch-minilm.sh")
}

/// The path in `var`, else what `scripts/<script>` prints (it fetches into a cache).
fn fetched(var: &str, script: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return p.into();
    }
    let path = format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Serving arguments for tests: small context and limits.
pub fn args(model: PathBuf) -> Args {
    Args {
        model,
        model_sha256: None,
        max_tokens: None,
        served_model_name: None,
        response_cache_ttl_secs: 0,
        prefix_cache: true,
        response_cache_max_bytes: 0,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key_file: None,
        max_batch: 8,
        max_batch_tokens: 16384,
        max_client_batch_size: 128,
        max_queue: 16,
        min_priority: -10,
        max_priority: 10,
        max_seq_len: 512,
        default_max_tokens: 32,
        max_body_bytes: 64 * 1024,
        request_timeout_secs: 120,
        drain_delay_secs: 0,
        q4_1: Q41Policy::Keep,
        threads: None,
        device: "cpu".into(),
    }
}

/// Starts a server on its own thread and runtime (it outlives any one test) and waits until
/// it is ready.
pub fn start(args: Args, api_key: Option<String>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            serve_on(listener, args, api_key, std::future::pending())
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    wait_ready(addr);
    addr
}

/// Polls /readyz until it answers 200 (the model loads in the background).
pub fn wait_ready(addr: SocketAddr) {
    // On a thread of its own: callers may be inside a runtime already.
    std::thread::spawn(move || wait_ready_blocking(addr))
        .join()
        .unwrap();
}

fn wait_ready_blocking(addr: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..600 {
            if let Ok(r) = request(addr, "GET", "/readyz", None, &[]).await
                && r.status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server at {addr} never became ready");
    });
}

/// A response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// The `data:` payloads of a server-sent-event body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
            .map(String::from)
            .collect()
    }
}

/// One request over a fresh connection (`Connection: close`), read to the end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr).await?;
    send(&mut s, method, path, body, headers).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    Ok(parse(&raw))
}

/// Writes a request on `s`.
pub async fn send(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = body.unwrap_or(b"");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await
}

/// Parses a whole HTTP/1.1 response, undoing chunked transfer encoding.
pub fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A chat request body.
pub fn chat_body(system: &str, user: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    serde_json::to_vec(&v).unwrap()
}

/// Sends a request and gives up after `after`: the connection is closed, as a client that
/// times out closes it. `None` when it gave up; the response when it came first.
pub async fn give_up_after(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    after: Duration,
) -> std::io::Result<Option<Response>> {
    let mut s = TcpStream::connect(addr).await?;
    send(&mut s, "POST", path, Some(body), &[]).await?;
    let mut raw = Vec::new();
    match tokio::time::timeout(after, s.read_to_end(&mut raw)).await {
        Ok(read) => read.map(|_| Some(parse(&raw))),
        Err(_) => Ok(None),
    }
}

/// The value of an unlabelled metric on /metrics (`None` when it is not there).
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let r = request(addr, "GET", "/metrics", None, &[]).await.ok()?;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls the metric `name` until `holds` accepts its value, for at most `within`; returns the
/// last value seen (or `None`), so the caller asserts with it.
pub async fn await_metric(
    addr: SocketAddr,
    name: &str,
    within: Duration,
    holds: impl Fn(f64) -> bool,
) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = metric(addr, name).await;
        if v.is_some_and(&holds) || tokio::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
