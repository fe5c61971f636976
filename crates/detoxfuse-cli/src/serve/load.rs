//! `detoxfuse bench serve`: a bounded load run against the server ([`detoxfuse::bench::load`]),
//! with a server started in this process unless `--url` names one.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use detoxfuse::bench::{load_matrix, LoadPlan, LoadServer};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Another server to load first, as NAME=URL (e.g. llama-server=http://127.0.0.1:8081),
    /// repeatable; it is sent no alpha. With --no-own only these are loaded.
    #[arg(long, value_name = "NAME=URL")]
    url: Vec<String>,
    /// Do not start (and load) a detoxfuse server of our own.
    #[arg(long)]
    no_own: bool,
    /// Requests per cell (server × alpha × concurrency).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    #[arg(long, value_delimiter = ',', default_value = "32")]
    concurrency: Vec<usize>,
    /// Tokens per completion.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Request alphas for our server, comma-separated (omit for the server's default).
    #[arg(long, value_delimiter = ',')]
    alpha: Vec<f64>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Queue size and batch rows of the server this command starts.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
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
    let mut servers = Vec::new();
    for spec in &a.url {
        let Some((name, url)) = spec.split_once('=') else {
            bail!("--url {spec:?}: give it as NAME=URL, e.g. llama-server=http://127.0.0.1:8081");
        };
        let host = url.trim_start_matches("http://").trim_end_matches('/');
        let (name, host) = (name.into(), host.into());
        servers.push(LoadServer {
            name,
            host,
            alphas: vec![None],
        });
    }
    let mut own = None;
    if !a.no_own {
        // The server runs in this process, on its own thread and runtime, and stops the way
        // SIGTERM stops it (graceful shutdown: in-flight requests finish).
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            a: super::ServeArgs,
        }
        let (queue, rows) = (a.queue.to_string(), a.max_batch.to_string());
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
            "--max-batch",
            &rows,
        ];
        let args = <Serve as clap::Parser>::try_parse_from(argv)?.a;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let cache = cache.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("detoxfuse-serve".into())
            .spawn(move || {
                let stop = async {
                    stop_rx.await.ok();
                };
                super::serve_until(&cache, args, stop, |addr| {
                    addr_tx.send(addr).ok();
                })
            })?;
        let Ok(addr) = addr_rx.recv() else {
            return match thread.join() {
                Ok(Err(e)) => Err(e.context("the server did not start")),
                _ => bail!("the server did not start"),
            };
        };
        let mut alphas: Vec<_> = a.alpha.iter().map(|&x| Some(x)).collect();
        if alphas.is_empty() {
            alphas.push(None); // the server's default
        }
        let (name, host) = ("detoxfuse".into(), addr.to_string());
        servers.push(LoadServer { name, host, alphas });
        own = Some((stop_tx, thread));
    }
    let plan = LoadPlan {
        model: &a.model,
        max_tokens: a.max_tokens,
        requests: a.requests,
        concurrency: &a.concurrency,
        api_key: a.api_key.as_deref(),
        retry_busy: (a.retry_busy_ms > 0).then(|| Duration::from_millis(a.retry_busy_ms)),
    };
    let table = load_matrix(&servers, &plan, &mut |c| println!("{c}"));
    let unexpected: usize = table.0.iter().map(|c| c.summary.unexpected()).sum();
    println!("\n{table}");
    if let Some((stop, thread)) = own {
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
    if unexpected > 0 {
        bail!("{unexpected} responses were neither 200 nor a deliberate 429/503");
    }
    Ok(())
}
