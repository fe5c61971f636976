//! `detoxfuse bench serve`: a bounded load run against the server ([`detoxfuse::bench::load`]),
//! with a server started in this process unless `--url` names one.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use detoxfuse::bench::{load, Load, LoadSummary};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Server to load, e.g. http://127.0.0.1:8080 (default: start one on a free port with the
    /// options below and stop it afterwards).
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tokens per completion.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Request alpha (omit for the server's default).
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Queue size of the server this command starts.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Calibration model of the server this command starts.
    #[arg(long, default_value = "default")]
    calibration: String,
    #[arg(long, env = "DETOXFUSE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// On 429/503 wait this many milliseconds and retry (as a polite client does); the
    /// rejections are still counted. 0 = take the rejection as the answer.
    #[arg(long, default_value_t = 0)]
    retry_busy_ms: u64,
}

pub fn run(cache: &Path, a: LoadArgs) -> Result<()> {
    let mut server = None;
    let host = match &a.url {
        Some(u) => u
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string(),
        None => {
            // The server runs in this process, on its own thread and runtime, and stops
            // the way SIGTERM stops it (graceful shutdown: in-flight requests finish).
            #[derive(clap::Parser)]
            struct Serve {
                #[command(flatten)]
                a: super::ServeArgs,
            }
            let queue = a.queue.to_string();
            let argv = [
                "serve",
                "--port",
                "0",
                "--model",
                &a.model,
                "--calibration",
                &a.calibration,
                "--queue",
                &queue,
            ];
            let args = <Serve as clap::Parser>::try_parse_from(argv)?.a;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let cache = cache.to_path_buf();
            let thread = std::thread::Builder::new()
                .name("detoxfuse-serve".into())
                .spawn(move || {
                    super::serve_until(
                        &cache,
                        args,
                        async {
                            stop_rx.await.ok();
                        },
                        |addr| {
                            addr_tx.send(addr).ok();
                        },
                    )
                })?;
            let Ok(addr) = addr_rx.recv() else {
                return match thread.join() {
                    Ok(Err(e)) => Err(e.context("the server did not start")),
                    _ => bail!("the server did not start"),
                };
            };
            server = Some((stop_tx, thread));
            addr.to_string()
        }
    };
    let mut body = serde_json::json!({
        "model": a.model, "prompt": "The most important thing about a good neighbour is",
        "max_tokens": a.max_tokens, "temperature": 1.0, "top_p": 0.9,
    });
    if let Some(alpha) = a.alpha {
        body["alpha"] = alpha.into();
    }
    let body = body.to_string();
    let t0 = Instant::now();
    let outcomes = load(&Load {
        host: &host,
        path: "/v1/completions",
        body: &body,
        api_key: a.api_key.as_deref(),
        requests: a.requests,
        concurrency: a.concurrency,
        retry_busy: (a.retry_busy_ms > 0).then(|| Duration::from_millis(a.retry_busy_ms)),
    });
    let summary = LoadSummary::new(&outcomes, t0.elapsed(), a.max_tokens);
    println!(
        "{} requests at concurrency {} ({} tokens each, alpha {}, server queue {}, retry after {} ms) in {:.1} s",
        summary.requests,
        a.concurrency,
        a.max_tokens,
        a.alpha.map_or("server default".into(), |x| x.to_string()),
        if a.url.is_some() { "?".to_string() } else { a.queue.to_string() },
        a.retry_busy_ms,
        summary.wall.as_secs_f64()
    );
    println!("{summary}");
    if let Some((stop, thread)) = server {
        let _ = stop.send(());
        let result = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
        println!(
            "server stopped after graceful shutdown: {} (crashes: {})",
            if result.is_ok() { "ok" } else { "error" },
            u8::from(result.is_err())
        );
        result.context("the server did not stop cleanly")?;
    }
    if summary.unexpected() > 0 {
        bail!(
            "{} responses were neither 200 nor a deliberate 429/503",
            summary.unexpected()
        );
    }
    Ok(())
}
