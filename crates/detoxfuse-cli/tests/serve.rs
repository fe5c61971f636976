//! `detoxfuse serve` end to end on the real SmolLM2: the official OpenAI Python client
//! (installed by scripts/setup_openai_env.sh, which scripts/test.sh runs), every validation
//! error, the bearer token, back-pressure and graceful shutdown.
//!
//! The calibration model here is SmolLM2's first 3 layers at initialisation and A is an
//! untrained alignment: these tests are about the serving machinery (alpha > 0 must change the
//! text, alpha 0 must equal `detoxfuse generate`), not about detoxification.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use detoxfuse::align::{Alignment, ModelId};
use detoxfuse::lm::export::{hf_llama_from_gguf, write_hf_dir};

fn model_path() -> PathBuf {
    let spec = detoxfuse::fetch::spec("smollm2").unwrap();
    detoxfuse::fetch::model_path(&detoxfuse::fetch::default_cache_dir(), &spec)
}

/// A calibration directory and an untrained alignment for SmolLM2.
fn fusion_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let cal = dir.join("cal");
    write_hf_dir(
        &hf_llama_from_gguf(&model_path(), Some(3)).unwrap(),
        &cal,
        &[],
    )
    .unwrap();
    let a = dir.join("a.safetensors");
    Alignment::untrained(
        ModelId::of(&cal, 576).unwrap(),
        ModelId::of(&model_path(), 576).unwrap(),
        5,
    )
    .unwrap()
    .save(&a)
    .unwrap();
    (cal, a)
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(cal: &Path, a: &Path, extra: &[&str]) -> Server {
    let mut cmd = common::bin();
    cmd.args(["serve", "--port", "0", "--calibration"])
        .arg(cal)
        .arg("--alignment")
        .arg(a)
        .args(extra)
        .env_remove("DETOXFUSE_API_KEY");
    let (child, port) = common::spawn_server(&mut cmd);
    Server { child, port }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8], key: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body); // the server may close early on an oversized body
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn error_type(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    v["error"]["type"].as_str().unwrap().to_string()
}

fn generate_texts(args: &[&str]) -> Vec<String> {
    let o = common::run(&[&["generate"], args].concat());
    assert!(o.status.success(), "{}", common::stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn openai_client_drives_the_server_and_alpha_zero_equals_generate() {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-openai/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup_openai_env.sh (scripts/test.sh does)",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let (cal, a) = fusion_fixture(dir.path());
    let server = serve(&cal, &a, &["--api-key", "sekret"]);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let o = std::process::Command::new(&python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .args(["smollm2", "sekret"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["models"], serde_json::json!(["smollm2"]));
    for name in ["0.0", "0.3", "default"] {
        let c = &r[format!("completions_{name}")];
        assert_eq!(
            c["texts"], c["streamed"],
            "alpha {name}: streaming must equal non-streaming"
        );
        assert!(c["usage"].as_u64().unwrap() > 0);
        assert_eq!(c["usage"], c["usage_streamed"]);
    }
    // alpha 0 is the untouched target: the same as `detoxfuse generate` with the same seed
    let expected = generate_texts(&[
        "--prompt",
        "The best thing about rainy days is",
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--seed",
        "7",
        "-n",
        "2",
    ]);
    assert_eq!(r["completions_0.0"]["texts"], serde_json::json!(expected));
    assert_ne!(r["completions_0.3"]["texts"], r["completions_0.0"]["texts"]);
    // the server's default alpha is 0.2: fused, so not the plain text either
    assert_ne!(
        r["completions_default"]["texts"],
        r["completions_0.0"]["texts"]
    );
    let chat0 = &r["chat_0.0"];
    assert_eq!(chat0["text"], chat0["streamed"]);
    assert_eq!(chat0["role"], "assistant");
    assert_eq!(chat0["stream_roles"], serde_json::json!(["assistant"]));
    let expected = generate_texts(&[
        "--chat",
        "--prompt",
        "Describe a rainy day in one sentence.",
        "--max-tokens",
        "16",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--seed",
        "3",
    ]);
    assert_eq!(chat0["text"], serde_json::json!(expected[0]));
    assert_eq!(r["chat_0.3"]["text"], r["chat_0.3"]["streamed"]);
    assert_eq!(r["bad_alpha"]["status"], 400);
    assert_eq!(r["wrong_key"]["status"], 401);
}

#[test]
fn invalid_requests_get_openai_errors_and_auth_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (cal, a) = fusion_fixture(dir.path());
    let s = serve(&cal, &a, &["--api-key", "k1", "--max-body", "4096"]);
    let p = s.port;
    let k = Some("k1");
    let post = |body: &str, key| http(p, "POST", "/v1/completions", body.as_bytes(), key);

    let (st, body) = http(p, "GET", "/health", b"", None);
    assert_eq!(st, 200, "health needs no key: {body}");
    let (st, body) = post(r#"{"model":"smollm2","prompt":"hi","max_tokens":2}"#, None);
    assert_eq!(
        (st, error_type(&body).as_str()),
        (401, "authentication_error")
    );
    let (st, _) = post(
        r#"{"model":"smollm2","prompt":"hi","max_tokens":2}"#,
        Some("k2"),
    );
    assert_eq!(st, 401);
    let (st, body) = post(r#"{"model":"smollm2","prompt":"hi","max_tokens":2}"#, k);
    assert_eq!(st, 200, "{body}");

    let with = |fields: &str| format!(r#"{{"model":"smollm2","prompt":"hi"{fields}}}"#);
    let cases: [(String, u16, &str); 8] = [
        (
            r#"{"model":"smollm2","prompt":"hi""#.into(),
            400,
            "invalid JSON",
        ),
        (r#"{"prompt":"hi"}"#.into(), 400, "model"),
        (
            r#"{"model":"gpt-4","prompt":"hi"}"#.into(),
            404,
            "not served here",
        ),
        (with(r#","alpha":1.5"#), 400, "outside [0, 1]"),
        (with(r#","alpha":-0.1"#), 400, "outside [0, 1]"),
        (with(r#","max_tokens":9000"#), 400, "context"),
        (with(r#","n":0"#), 400, "n must be"),
        (with(r#","top_p":0"#), 400, "top_p"),
    ];
    for (body, status, needle) in cases {
        let (st, resp) = post(&body, k);
        assert_eq!(st, status, "{body} -> {resp}");
        assert!(resp.contains(needle), "{needle:?} not in {resp}");
        assert_eq!(error_type(&resp), "invalid_request_error", "{resp}");
    }
    let big = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "a".repeat(10_000));
    let (st, resp) = post(&big, k);
    assert_eq!(st, 413, "{resp}");
    assert!(resp.contains("too large"), "{resp}");
    let (st, resp) = http(p, "GET", "/v2/nothing", b"", k);
    assert_eq!(st, 404, "{resp}");
    let (st, resp) = http(
        p,
        "POST",
        "/v1/chat/completions",
        br#"{"model":"smollm2","messages":[]}"#,
        k,
    );
    assert_eq!(st, 400, "{resp}");
    // still serving after all of that
    let (st, _) = post(r#"{"model":"smollm2","prompt":"hi","max_tokens":2}"#, k);
    assert_eq!(st, 200);
}

#[test]
fn a_full_queue_answers_429_at_once_and_shutdown_finishes_in_flight_work() {
    let dir = tempfile::tempdir().unwrap();
    let (cal, a) = fusion_fixture(dir.path());
    let s = serve(
        &cal,
        &a,
        &["--queue", "1", "--max-batch", "1", "--max-n", "1"],
    );
    let p = s.port;
    let body = r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":40,"alpha":0}"#;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let (st, resp) = http(p, "POST", "/v1/completions", body.as_bytes(), None);
                (st, resp, t0.elapsed())
            })
        })
        .collect();
    let results: Vec<(u16, String, Duration)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(busy.len() + ok, 8, "only 200 or 429: {results:?}");
    assert!(
        !busy.is_empty(),
        "8 requests into 1 running + 1 queued must overflow"
    );
    assert!(ok >= 1, "{results:?}");
    for (_, resp, t) in &busy {
        assert!(
            *t < Duration::from_secs(2),
            "429 must be immediate, took {t:?}"
        );
        assert_eq!(error_type(resp), "rate_limit_error");
    }

    // SIGTERM while a request runs: it still completes, then the server exits cleanly
    let mut s = s;
    let long = std::thread::spawn(move || {
        http(
            p,
            "POST",
            "/v1/completions",
            br#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":60,"alpha":0}"#,
            None,
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    let st = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let (st, resp) = long.join().unwrap();
    assert_eq!(st, 200, "in-flight request must finish: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 60);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "server exit: {status}");
}

/// 500 connections that never finish their headers and 50 clients that send a request one
/// byte a second do not stop the server answering others at once; the header-read timeout
/// then closes the idle ones, and a body that trickles in gets 408.
#[test]
fn idle_and_slow_clients_do_not_stop_the_server_answering_others() {
    let mut cmd = common::bin();
    cmd.args([
        "serve",
        "--port",
        "0",
        "--calibration",
        "none",
        "--read-timeout",
        "3",
    ])
    .env_remove("DETOXFUSE_API_KEY");
    let (child, port) = common::spawn_server(&mut cmd);
    let _server = Server { child, port };
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<_> = (0..50)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n";
                for b in req.iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                        || s.write_all(&[*b]).is_err()
                    {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let (status, _) = http(port, "GET", "/health", b"", None);
    assert_eq!(status, 200);
    let body = br#"{"model": "smollm2", "prompt": "Hello", "max_tokens": 4}"#;
    let (status, text) = http(port, "POST", "/v1/completions", body, None);
    assert_eq!(status, 200, "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "answered in {:?}",
        t0.elapsed()
    );
    // the idle connections are closed by the header-read timeout (3 s here)
    std::thread::sleep(Duration::from_secs(5));
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 500, "idle connections closed by the server");
    // headers complete, body one byte a second: 408 once the read timeout passes
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
}
