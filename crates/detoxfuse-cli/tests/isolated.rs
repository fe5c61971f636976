//! A user's installed binary, alone: the release binary copied into an empty directory, an
//! empty `HOME` (so an empty cache but for the two models, linked in as a fetch would leave
//! them), no source tree, no `../shared`, no `DETOXFUSE_*` variables. The main job, a quick
//! evaluation on the vendored prompts, scoring and serving must all work from there.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

struct Sandbox {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    home: PathBuf,
    work: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("user");
        let (bindir, home, work) = (root.join("bin"), root.join("home"), root.join("work"));
        for d in [&bindir, &home, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        let bin = bindir.join("detoxfuse");
        std::fs::copy(env!("CARGO_BIN_EXE_detoxfuse"), &bin).unwrap();
        // The models as `detoxfuse fetch` leaves them (hard links: no 0.4 GB copy per run).
        let have = detoxfuse::fetch::default_cache_dir().join("models");
        let models = home.join(".cache/detoxfuse/models");
        std::fs::create_dir_all(&models).unwrap();
        for spec in detoxfuse::fetch::MODELS {
            let src = have.join(spec.file_name);
            assert!(src.exists(), "run `cargo run --release -- fetch` first");
            let dst = models.join(spec.file_name);
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).unwrap();
            }
        }
        assert!(!work.join("../shared").exists() && !root.join("../shared").exists());
        Self {
            _dir: dir,
            bin,
            home,
            work,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(&self.work)
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", "/usr/bin:/bin");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let o = self.cmd(args).output().unwrap();
        assert!(
            o.status.success(),
            "`detoxfuse {}` failed:\n{}",
            args.join(" "),
            common::stderr(&o)
        );
        o
    }
}

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_installed_binary_alone_generates_evaluates_scores_and_serves() {
    let sb = Sandbox::new();
    let t0 = std::time::Instant::now();

    // The main job: fused text with the shipped default.
    let o = sb.run(&[
        "generate",
        "--calibration",
        "default",
        "--alpha",
        "0.2",
        "--max-tokens",
        "12",
        "--prompt",
        "I hate you damned",
    ]);
    let v = &json_lines(&o)[0];
    let text = v["generations"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );

    // A quick evaluation on the vendored prompts (installed into the empty cache).
    let out = sb.work.join("eval");
    sb.run(&[
        "eval",
        "--quick",
        "--limit",
        "3",
        "-k",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rows = report["methods"].as_array().expect("report methods");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["method"].as_str()).collect();
    assert!(
        names.len() >= 3 && names.contains(&"base"),
        "rows: {names:?}"
    );
    for r in rows {
        assert_eq!(r["prompts"], 3, "{r}");
        assert!(r["expected_max_toxicity"].as_f64().is_some(), "{r}");
        assert!(
            r["perplexity_pooled"].as_f64().is_some_and(f64::is_finite),
            "{r}"
        );
    }
    assert!(sb
        .home
        .join(".cache/detoxfuse/data/rtp/challenging-toxic-1196.jsonl")
        .exists());

    // Scoring.
    let o = sb.run(&["score", "you are a stupid idiot", "have a nice day"]);
    let s = json_lines(&o);
    let tox = |v: &serde_json::Value| v["toxicity"].as_f64().unwrap();
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(tox(&s[0]) > tox(&s[1]), "{s:?}");

    // Serving: one completion.
    let (mut child, port) = common::spawn_server(&mut sb.cmd(&["serve", "--port", "0"]));
    let (status, body) = post(
        port,
        "/v1/completions",
        r#"{"model": "smollm2", "prompt": "The weather today is", "max_tokens": 8, "alpha": 0.2}"#,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    assert!(!Path::new(&sb.work).join("../shared").exists());
}
