//! Graceful shutdown of the real binary: on SIGTERM readiness fails at once, the in-flight
//! streaming request still finishes, then the process exits 0.

mod serve_support;

use serde_json::json;
use serve_support::{chat_body, request, send, smollm2, wait_ready};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use tokio::io::AsyncReadExt;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_anneal-runtime"))
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--max-seq-len",
            "512",
            "--drain-delay-secs",
            "2",
        ])
        .arg("--model")
        .arg(smollm2())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || wait_ready(addr))
        .await
        .unwrap();

    let body = chat_body(
        "s",
        "Write a poem about the sea.",
        json!({"max_tokens": 48, "stream": true, "temperature": 0}),
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    send(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &[],
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("data:") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        raw.extend_from_slice(&buf[..n]);
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Readiness fails at once (the listener stays open for the drain delay).
    let mut ready_failed = false;
    let since = std::time::Instant::now();
    while since.elapsed().as_millis() < 1500 {
        match request(addr, "GET", "/readyz", None, &[]).await {
            Ok(r) if r.status == 503 => {
                ready_failed = true;
                break;
            }
            Ok(_) => tokio::task::yield_now().await,
            Err(_) => break,
        }
    }
    assert!(ready_failed, "readiness did not turn 503 after SIGTERM");

    stream.read_to_end(&mut raw).await.unwrap();
    let r = serve_support::parse(&raw);
    assert_eq!(
        r.sse_data().last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.body
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
