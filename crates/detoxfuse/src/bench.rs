//! Speed measurements: prompt processing and decoding, batch 1 and batched sampling.
//! Times are medians over runs; callers compare ratios measured in the same process.

use std::time::Instant;

use crate::error::Result;
use crate::generate::Decoder;
use crate::lm::TokenId;
use crate::sample::{sample_rows, Sampler, SamplingParams};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Speed {
    /// Prompt tokens per second (one forward over the whole prompt, batch 1).
    pub prompt_tps: f64,
    /// Generated tokens per second at batch 1.
    pub decode_tps: f64,
    /// Generated tokens per second over all rows when `batch` samples decode together.
    pub batched_tps: f64,
    pub batch: usize,
}

/// The middle value (upper middle for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Speed {
    /// The per-field medians of several measurements (one each).
    pub fn median_of(v: &[Speed]) -> Speed {
        let m = |g: fn(&Speed) -> f64| median(v.iter().map(g).collect());
        Speed {
            prompt_tps: m(|s| s.prompt_tps),
            decode_tps: m(|s| s.decode_tps),
            batched_tps: m(|s| s.batched_tps),
            batch: v.first().map_or(0, |s| s.batch),
        }
    }
}

/// What each speed measurement decodes after its prompt, and how often.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Decode {
    /// Tokens generated per measurement.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 64))]
    pub decode_tokens: usize,
    /// Samples decoded together in the batched measurement.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 25))]
    pub batch: usize,
    /// Repetitions; medians are reported.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 3))]
    pub runs: usize,
}

impl Decode {
    /// The line a benchmark prints first: threads and the measurement's shape.
    pub fn describe(&self, prompt_tokens: usize) -> String {
        format!(
            "threads {}, prompt {prompt_tokens} tokens, decode {} tokens, batch {}",
            threads(),
            self.decode_tokens,
            self.batch
        )
    }
}

/// What `detoxfuse bench fused` measures per target: plain against fused decoding of the same
/// synthetic prompt, in alternating runs (medians).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FusedSpeed {
    pub target: String,
    /// The calibration model reads another tokenizer's tokens (re-encoding every step).
    pub cross_tokenizer: bool,
    pub plain: Speed,
    pub fused: Speed,
}

impl FusedSpeed {
    pub const HEADER: &'static str =
        "target       path   plain t/s   fused t/s   ratio | plain batched fused batched   ratio";

    /// Measures `fusion` at `alpha` over `target` (tokenizer `tok`), `runs` times each.
    pub fn measure(
        name: &str,
        target: &dyn crate::lm::CausalLm,
        tok: &crate::text::Tokenizer,
        fusion: &crate::calibration::Fusion,
        alpha: f64,
        prompt_tokens: usize,
        shape: &Decode,
    ) -> Result<FusedSpeed> {
        let prompt = synthetic_prompt(prompt_tokens, tok.vocab_size().min(32_000), tok.bos);
        let Decode {
            decode_tokens,
            batch,
            runs,
        } = *shape;
        let (mut plain, mut fused) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let mut p = crate::generate::PlainDecoder::new(target);
            plain.push(measure(&mut p, &prompt, decode_tokens, batch, 1)?);
            let mut d = fusion.decoder(target, tok, alpha)?;
            fused.push(measure(&mut d, &prompt, decode_tokens, batch, 1)?);
        }
        Ok(FusedSpeed {
            target: name.to_string(),
            cross_tokenizer: !crate::fuse::same_tokenizer(tok, &fusion.tokenizer),
            plain: Speed::median_of(&plain),
            fused: Speed::median_of(&fused),
        })
    }
}

/// The row under [`FusedSpeed::HEADER`].
impl std::fmt::Display for FusedSpeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, q) = (&self.plain, &self.fused);
        write!(
            f,
            "{:<10} {:>6} {:>11.1} {:>11.1} {:>7.2} | {:>13.1} {:>13.1} {:>7.2}",
            self.target,
            if self.cross_tokenizer {
                "cross"
            } else {
                "shared"
            },
            p.decode_tps,
            q.decode_tps,
            q.decode_tps / p.decode_tps,
            p.batched_tps,
            q.batched_tps,
            q.batched_tps / p.batched_tps
        )
    }
}

/// What `detoxfuse bench` measures per model: the engine, and llama.cpp on the same file
/// (prompt and decode tokens/s) when it ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineSpeed {
    pub model: String,
    pub speed: Speed,
    pub llama_cpp: Option<(f64, f64)>,
}

impl EngineSpeed {
    pub const HEADER: &'static str = "model        prompt t/s   decode t/s    batched t/s   batch÷1 | llama.cpp pp llama.cpp tg pp ratio tg ratio";

    /// Measures the model at `path` (`name` in the row) on a synthetic prompt, and llama.cpp
    /// on the same file and prompt when `llama_cpp_python` is given; returns the row and, if
    /// llama.cpp was asked for and failed, why.
    pub fn measure(
        name: &str,
        path: &std::path::Path,
        prompt_tokens: usize,
        shape: &Decode,
        llama_cpp_python: Option<&std::path::Path>,
    ) -> Result<(Self, Option<crate::Error>)> {
        let model = crate::lm::load(path)?;
        let tok = crate::text::Tokenizer::for_model(path)?;
        let prompt = synthetic_prompt(
            prompt_tokens,
            tok.vocab_size(),
            tok.bos.filter(|_| tok.add_bos),
        );
        let Decode {
            decode_tokens,
            batch,
            runs,
        } = *shape;
        let mut dec = crate::generate::PlainDecoder::new(model.as_ref());
        let speed = measure(&mut dec, &prompt, decode_tokens, batch, runs)?;
        let (llama_cpp, failed) = match llama_cpp_python {
            None => (None, None),
            Some(py) => match llama_cpp_speed(py, path, threads(), decode_tokens, runs, &prompt) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            },
        };
        let row = Self {
            model: name.to_string(),
            speed,
            llama_cpp,
        };
        Ok((row, failed))
    }
}

/// The row under [`EngineSpeed::HEADER`] (NaN where llama.cpp did not run).
impl std::fmt::Display for EngineSpeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.speed;
        let (pp, tg) = self.llama_cpp.unwrap_or((f64::NAN, f64::NAN));
        write!(
            f,
            "{:<10} {:>12.1} {:>12.1} {:>14.1} {:>8.2}x | {:>12.1} {:>12.1} {:>7.2}x {:>7.2}x",
            self.model,
            s.prompt_tps,
            s.decode_tps,
            s.batched_tps,
            s.batched_tps / s.decode_tps,
            pp,
            tg,
            s.prompt_tps / pp,
            s.decode_tps / tg
        )
    }
}

/// Deterministic prompt of `n` tokens cycling through ordinary ids.
pub fn synthetic_prompt(n: usize, vocab: usize, first: Option<TokenId>) -> Vec<TokenId> {
    let mut p: Vec<TokenId> = first.into_iter().collect();
    let mut x: u64 = 12345;
    while p.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // stay in the lower part of the vocabulary, away from special tokens at the end
        p.push(1000 + ((x >> 33) as usize % (vocab / 2).max(1)) as TokenId);
    }
    p
}

/// Measures one decoder; `runs` repetitions of each phase, medians reported.
pub fn measure(
    dec: &mut dyn Decoder,
    prompt: &[TokenId],
    decode_tokens: usize,
    batch: usize,
    runs: usize,
) -> Result<Speed> {
    let mut prompt_t = Vec::new();
    let mut decode_t = Vec::new();
    let mut batched_t = Vec::new();
    let params = SamplingParams {
        top_p: 0.9,
        seed: 1,
        ..Default::default()
    };
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let mut logits = dec.prefill(prompt)?;
        prompt_t.push(prompt.len() as f64 / t0.elapsed().as_secs_f64());

        let mut s = Sampler::new(&SamplingParams::greedy(), 0);
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            let t = s.sample(&logits);
            logits = dec.step(&[t])?.remove(0);
        }
        decode_t.push(decode_tokens as f64 / t0.elapsed().as_secs_f64());

        let first = dec.prefill(prompt)?;
        let mut samplers: Vec<Sampler> = (0..batch)
            .map(|i| Sampler::new(&params, i as u64))
            .collect();
        let t0 = Instant::now();
        dec.fork(batch)?;
        let mut rows = vec![first; batch];
        for _ in 0..decode_tokens {
            let toks = sample_rows(&mut samplers.iter_mut().collect::<Vec<_>>(), &rows);
            rows = dec.step(&toks)?;
        }
        batched_t.push((batch * decode_tokens) as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(Speed {
        prompt_tps: median(prompt_t),
        decode_tps: median(decode_t),
        batched_tps: median(batched_t),
        batch,
    })
}

/// Threads candle uses (`RAYON_NUM_THREADS`, else all cores).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs one of the embedded reference scripts with `python -c` (the arguments keep their
/// `sys.argv` positions, nothing is read from the source tree) and parses the JSON object
/// on its last line of output.
fn run_script(
    py: &std::path::Path,
    script: &str,
    what: &str,
    args: &[String],
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| crate::Error::Input(format!("running {}: {e}", py.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(crate::Error::Input(format!(
            "{what} failed: {}",
            err.lines().last().unwrap_or("")
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap_or("")).map_err(|e| {
        crate::Error::Input(format!("{what} printed {text:?}, not its JSON line ({e})"))
    })
}

/// llama.cpp's prompt and decode tokens/s on `model` (llama-cpp-python in `py`), the same
/// prompt, threads and decode length: `(prompt_tps, decode_tps)`.
pub fn llama_cpp_speed(
    py: &std::path::Path,
    model: &std::path::Path,
    threads: usize,
    decode: usize,
    runs: usize,
    prompt: &[TokenId],
) -> Result<(f64, f64)> {
    let v = run_script(
        py,
        include_str!("../../../scripts/bench_llama_cpp.py"),
        "llama.cpp bench",
        &[
            model.display().to_string(),
            threads.to_string(),
            decode.to_string(),
            runs.to_string(),
            serde_json::to_string(prompt)?,
        ],
    )?;
    Ok((
        v["prompt_tps"].as_f64().unwrap_or(f64::NAN),
        v["decode_tps"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// PyTorch's calibration training speed on the same architecture and batch (torch and
/// transformers in `py`): `tokens_per_s`, `step_seconds`, `peak_rss_mib`, `torch`.
pub fn torch_train_speed(
    py: &std::path::Path,
    rows: usize,
    len: usize,
    layers: usize,
    steps: usize,
    threads: usize,
) -> Result<serde_json::Value> {
    let arg = |k: &str, v: usize| [format!("--{k}"), v.to_string()];
    let args: Vec<String> = [
        arg("rows", rows),
        arg("len", len),
        arg("layers", layers),
        arg("steps", steps),
        arg("threads", threads),
    ]
    .concat();
    run_script(
        py,
        include_str!("../../../scripts/bench_train_torch.py"),
        "the PyTorch training bench",
        &args,
    )
}

/// What one request of a load run came back with.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The HTTP status, `None` for a connection error.
    pub status: Option<u16>,
    pub latency: std::time::Duration,
    /// 429/503 answers received before the final one.
    pub rejections: usize,
    /// `usage.completion_tokens` of a 200 (0 when the answer has none).
    pub completion_tokens: usize,
}

/// A load run: `requests` POSTs of `body` to `http://{host}{path}` from `concurrency`
/// clients (threads; one connection per request, like many simple API clients). With
/// `retry_busy` a 429/503 is retried after that pause (and counted).
pub struct Load<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub body: &'a str,
    pub api_key: Option<&'a str>,
    pub requests: usize,
    pub concurrency: usize,
    pub retry_busy: Option<std::time::Duration>,
}

/// One request; the status of the response and its `usage.completion_tokens`.
fn post(l: &Load) -> std::io::Result<(u16, Option<usize>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(l.host)?;
    let auth = l
        .api_key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{}",
        l.path,
        l.host,
        l.body.len(),
        l.body
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status in the response"))?;
    let tokens = resp
        .split_once("\"completion_tokens\":")
        .and_then(|(_, rest)| {
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        });
    Ok((status, tokens))
}

/// The body of a `/v1/completions` request of the load runs (a fixed prompt, sampled at
/// temperature 1, top-p 0.9); `alpha` is sent only when given (other servers lack it).
pub fn completion_body(model: &str, max_tokens: usize, alpha: Option<f64>) -> String {
    let mut body = serde_json::json!({
        "model": model, "prompt": "The most important thing about a good neighbour is",
        "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.9,
    });
    if let Some(alpha) = alpha {
        body["alpha"] = alpha.into();
    }
    body.to_string()
}

/// A `kB` field of /proc/self/status (`VmRSS`, `VmHWM`), in MiB (0 where unavailable).
pub fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a load run gives back: each request's outcome, in no particular order, and this
/// process's peak resident memory (MiB) in each window of 1,000 answers (a server started in
/// the same process included; the last window may be shorter).
///
/// Peaks per window, not samples: what a sample shows depends on what the server's batch
/// holds at that instant (a full batch's KV buffers are hundreds of MiB, freed when it
/// empties), while every window sees the batch full; a leak makes the peaks climb.
pub struct LoadRun {
    pub outcomes: Vec<Outcome>,
    pub rss_mib: Vec<(usize, f64)>,
}

/// Starts a new peak-RSS window for this process (Linux: `/proc/self/clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `l`.
pub fn load(l: &Load) -> LoadRun {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let answered = AtomicUsize::new(0);
    let rss = std::sync::Mutex::new(Vec::new());
    let outcomes = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..l.concurrency.max(1))
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < l.requests {
                        let t = Instant::now();
                        let mut rejections = 0;
                        let answer = loop {
                            let s = post(l).ok();
                            match (l.retry_busy, s) {
                                (Some(pause), Some((429 | 503, _))) => {
                                    rejections += 1;
                                    std::thread::sleep(pause);
                                }
                                _ => break s,
                            }
                        };
                        out.push(Outcome {
                            status: answer.map(|a| a.0),
                            latency: t.elapsed(),
                            rejections,
                            completion_tokens: answer.and_then(|a| a.1).unwrap_or(0),
                        });
                        let done = answered.fetch_add(1, Ordering::AcqRel) + 1;
                        if done.is_multiple_of(1000) {
                            let mut rss = rss.lock().unwrap_or_else(|e| e.into_inner());
                            rss.push((done, proc_status_mib("VmHWM")));
                            reset_peak_rss();
                        }
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    let mut rss_mib = rss.into_inner().unwrap_or_else(|e| e.into_inner());
    rss_mib.sort_by_key(|r| r.0);
    if !outcomes.len().is_multiple_of(1000) {
        rss_mib.push((outcomes.len(), proc_status_mib("VmHWM")));
    }
    LoadRun { outcomes, rss_mib }
}

/// The `p` quantile (0..=1) of sorted durations (zero for none).
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What a load run measured, summed up ([`std::fmt::Display`] prints it as the report lines
/// of `detoxfuse bench serve`).
#[derive(Debug, Clone)]
pub struct LoadSummary {
    pub requests: usize,
    pub wall: std::time::Duration,
    /// Responses per status ("connection error" for none).
    pub counts: std::collections::BTreeMap<String, usize>,
    /// Latencies of the 200s and of the final 429/503s, sorted.
    pub ok: Vec<std::time::Duration>,
    pub busy: Vec<std::time::Duration>,
    /// 429/503 answers that were retried (with `retry_busy`).
    pub retried: usize,
    /// Completion tokens the 200s report (`usage.completion_tokens`).
    pub completion_tokens: usize,
    /// Peak resident memory (MiB) of this process in each window of 1,000 answers
    /// ([`LoadRun`]), keyed by the answers so far.
    pub rss_mib: Vec<(usize, f64)>,
    /// The highest of those peaks.
    pub peak_rss_mib: f64,
}

impl LoadSummary {
    pub fn new(run: &LoadRun, wall: std::time::Duration) -> Self {
        let outcomes = &run.outcomes;
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for o in outcomes {
            let k = o
                .status
                .map_or("connection error".into(), |s| s.to_string());
            *counts.entry(k).or_default() += 1;
        }
        let latencies = |keep: fn(Option<u16>) -> bool| {
            let mut v: Vec<_> = outcomes
                .iter()
                .filter(|o| keep(o.status))
                .map(|o| o.latency)
                .collect();
            v.sort();
            v
        };
        Self {
            requests: outcomes.len(),
            wall,
            counts,
            ok: latencies(|s| s == Some(200)),
            busy: latencies(|s| matches!(s, Some(429) | Some(503))),
            retried: outcomes.iter().map(|o| o.rejections).sum(),
            completion_tokens: outcomes
                .iter()
                .filter(|o| o.status == Some(200))
                .map(|o| o.completion_tokens)
                .sum(),
            rss_mib: run.rss_mib.clone(),
            peak_rss_mib: run.rss_mib.iter().map(|r| r.1).fold(0.0, f64::max),
        }
    }

    /// Completion tokens per second of wall time (what the 200s report generating).
    pub fn tokens_per_second(&self) -> f64 {
        self.completion_tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Responses that were neither 200 nor a deliberate 429/503 (errors of the server).
    pub fn unexpected(&self) -> usize {
        self.counts
            .iter()
            .filter(|(k, _)| !["200", "429", "503"].contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }
}

impl std::fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.wall.as_secs_f64().max(1e-9);
        let ms = |v: &[std::time::Duration], p| percentile(v, p).as_secs_f64() * 1e3;
        writeln!(
            f,
            "completed (200): {} = {:.2} req/s, {:.1} completion tok/s (usage.completion_tokens); latency p50 {:.0} ms, p99 {:.0} ms",
            self.ok.len(),
            self.ok.len() as f64 / secs,
            self.tokens_per_second(),
            ms(&self.ok, 0.5),
            ms(&self.ok, 0.99)
        )?;
        writeln!(
            f,
            "rejected (429/503): {}; their latency p50 {:.1} ms, p99 {:.1} ms",
            self.busy.len(),
            ms(&self.busy, 0.5),
            ms(&self.busy, 0.99)
        )?;
        write!(f, "status counts: {:?}", self.counts)?;
        if self.retried > 0 {
            write!(f, "\n429/503 answers retried: {}", self.retried)?;
        }
        let rss: Vec<String> = self
            .rss_mib
            .iter()
            .map(|(n, m)| format!("{n}: {m:.0}"))
            .collect();
        write!(
            f,
            "\npeak resident MiB of this process in each window up to N answers: {}; highest {:.0}",
            rss.join(", "),
            self.peak_rss_mib
        )
    }
}

/// One cell of a load matrix: a server, an α and a concurrency.
#[derive(Debug, Clone)]
pub struct LoadCell {
    pub server: String,
    pub alpha: Option<f64>,
    pub concurrency: usize,
    pub summary: LoadSummary,
}

impl std::fmt::Display for LoadCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let alpha = self
            .alpha
            .map_or("server default".into(), |x| x.to_string());
        let (n, wall) = (self.summary.requests, self.summary.wall.as_secs_f64());
        writeln!(
            f,
            "{}: {n} requests at concurrency {}, alpha {alpha}, in {wall:.1} s",
            self.server, self.concurrency
        )?;
        write!(f, "{}", self.summary)
    }
}

/// Load runs over servers × α × concurrency, measured in one process one after another, so
/// that ratios between cells are comparable ([`std::fmt::Display`]: a markdown table with
/// each cell's throughput ÷ the same server and α at the lowest concurrency, ÷ α 0 at the
/// same concurrency, and ÷ the first server's at the same α and concurrency).
#[derive(Debug, Clone, Default)]
pub struct LoadTable(pub Vec<LoadCell>);

impl std::fmt::Display for LoadTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A cell without alpha (another server) counts as α 0.
        let alpha = |c: &LoadCell| c.alpha.unwrap_or(0.0);
        let tps = |server: &str, a: f64, concurrency: usize| {
            self.0
                .iter()
                .find(|o| o.server == server && alpha(o) == a && o.concurrency == concurrency)
                .map(|o| o.summary.tokens_per_second())
        };
        let ratio = |x: f64, base: Option<f64>| {
            base.filter(|b| *b > 0.0)
                .map_or("–".to_string(), |b| format!("{:.2}×", x / b))
        };
        let lowest = self.0.iter().map(|c| c.concurrency).min().unwrap_or(1);
        let first = self.0.first().map(|c| c.server.clone()).unwrap_or_default();
        writeln!(f, "| server | α | concurrency | requests | 200 | completion tok/s | ÷ concurrency {lowest} | ÷ α 0 | ÷ {first} | p50 ms | p99 ms | 429/503 |")?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        let ms = |v: &[std::time::Duration], p| percentile(v, p).as_secs_f64() * 1e3;
        for c in &self.0 {
            let s = &c.summary;
            let t = s.tokens_per_second();
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {:.0} | {:.0} | {} |",
                c.server,
                c.alpha.map_or("default".into(), |a| a.to_string()),
                c.concurrency,
                s.requests,
                s.ok.len(),
                t,
                ratio(t, tps(&c.server, alpha(c), lowest)),
                ratio(t, tps(&c.server, 0.0, c.concurrency)),
                ratio(t, tps(&first, alpha(c), c.concurrency)),
                ms(&s.ok, 0.5),
                ms(&s.ok, 0.99),
                s.busy.len() + s.retried,
            )?;
        }
        Ok(())
    }
}

/// A server of a load matrix: its name, `host:port`, and the α of each of its cells (`None`:
/// the request carries no alpha).
pub struct LoadServer {
    pub name: String,
    pub host: String,
    pub alphas: Vec<Option<f64>>,
}

/// What every cell of a load matrix sends ([`completion_body`]) and how.
pub struct LoadPlan<'a> {
    pub model: &'a str,
    pub max_tokens: usize,
    pub requests: usize,
    pub concurrency: &'a [usize],
    pub api_key: Option<&'a str>,
    pub retry_busy: Option<std::time::Duration>,
}

/// Runs every server × α × concurrency cell one after another; `on_cell` sees each as it ends.
pub fn load_matrix(
    servers: &[LoadServer],
    plan: &LoadPlan,
    on_cell: &mut dyn FnMut(&LoadCell),
) -> LoadTable {
    let mut table = LoadTable::default();
    for s in servers {
        for &alpha in &s.alphas {
            for &concurrency in plan.concurrency {
                let body = completion_body(plan.model, plan.max_tokens, alpha);
                let t0 = Instant::now();
                let run = load(&Load {
                    host: &s.host,
                    path: "/v1/completions",
                    body: &body,
                    api_key: plan.api_key,
                    requests: plan.requests,
                    concurrency,
                    retry_busy: plan.retry_busy,
                });
                let cell = LoadCell {
                    server: s.name.clone(),
                    alpha,
                    concurrency,
                    summary: LoadSummary::new(&run, t0.elapsed()),
                };
                on_cell(&cell);
                table.0.push(cell);
            }
        }
    }
    table
}
