//! The serving engine, without HTTP or an async runtime: one worker thread owns the models
//! (decoding is CPU-bound and already uses every core); callers validate a request
//! ([`Engine::prepare`]), then hand it over through a bounded queue ([`Engine::submit`]) with
//! a sink for its events (text deltas, then the result). A full queue is refused at once, so
//! memory stays bounded under any load. The `n` samples of a request decode together as one
//! batch. A sink that reports its receiver gone, or a request past its deadline, cancels the
//! job at the next token.
//!
//! `detoxfuse serve` puts axum, the OpenAI wire types and server-sent events around this.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::calibration::Fusion;
use crate::error::{Error, Result};
use crate::fuse::{FusedDecoder, Prefill};
use crate::generate::{prompt_ids, Decoder, Generation, GenerationConfig, Samples};
use crate::lm::{CausalLm, TokenId};
use crate::sample::{sample_rows, SamplingParams};
use crate::text::Tokenizer;

/// What a job reports, in order: deltas, then one `Done`.
#[derive(Debug)]
pub enum JobEvent {
    Delta { index: usize, text: String },
    Done(std::result::Result<Vec<Generation>, String>),
}

/// Where a job's events go. `send` returns false once nobody listens (the job stops).
pub trait EventSink: Send {
    fn send(&mut self, e: JobEvent) -> bool;
    /// Whether the listener is gone already (a queued job is then skipped).
    fn is_closed(&self) -> bool;
}

impl EventSink for std::sync::mpsc::Sender<JobEvent> {
    fn send(&mut self, e: JobEvent) -> bool {
        std::sync::mpsc::Sender::send(self, e).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// The engine's limits (`detoxfuse serve`'s flags under the `clap` feature).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Limits {
    /// Requests waiting to join the running batch; more get 429 at once.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().queue))]
    pub queue: usize,
    /// Most rows (samples of running requests) decoded in one step; a request that does not
    /// fit waits, and those behind it too (first come, first served).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().max_batch))]
    pub max_batch: usize,
    /// Most prompt tokens read between two decode steps: a long prompt joins a chunk at a
    /// time, so running requests keep a bounded step time.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().prefill_chunk))]
    pub prefill_chunk: usize,
    /// Seconds a request may take, queueing included (504 beyond; the job is cancelled).
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", default_value = "300", value_parser = seconds))]
    pub timeout: Duration,
    /// Most samples per request (`n`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().max_n))]
    pub max_n: usize,
    /// Fusion strength used when a request does not send `alpha` (0 without a calibration).
    #[cfg_attr(feature = "clap", arg(long = "alpha", value_name = "ALPHA", default_value_t = Limits::default().default_alpha))]
    pub default_alpha: f64,
    /// Most tokens one request may generate, n × max_tokens (400 beyond).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().max_request_tokens))]
    pub max_request_tokens: usize,
    /// Most tokens (n × (prompt + max_tokens)) queued and running requests may hold
    /// together (their KV caches); more get 429 at once.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = Limits::default().max_queued_tokens))]
    pub max_queued_tokens: usize,
}

/// A duration given in whole seconds.
#[cfg(feature = "clap")]
fn seconds(s: &str) -> std::result::Result<Duration, String> {
    s.parse()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 16,
            max_batch: 32,
            prefill_chunk: 256,
            timeout: Duration::from_secs(300),
            max_n: 16,
            default_alpha: 0.2,
            max_request_tokens: 16 * 512,
            max_queued_tokens: 1 << 17,
        }
    }
}

/// A request's sampling parameters as a client sends them (each optional).
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub alpha: Option<f64>,
    pub n: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// A parameter is out of range (`param`, `code` say which and why).
    Invalid,
    /// The prompt and `max_tokens` exceed the model's context.
    ContextLength,
    /// The queue is full: retry shortly.
    Busy,
    /// The engine is stopping.
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct Reject {
    pub kind: RejectKind,
    pub message: String,
    pub param: Option<&'static str>,
    /// An OpenAI-style error code (`invalid_value`, ...), when there is one.
    pub code: Option<&'static str>,
}

impl Reject {
    fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self {
            kind: RejectKind::Invalid,
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

/// A validated request, ready for [`Engine::submit`].
#[derive(Debug, Clone)]
pub struct Prepared {
    pub ids: Vec<TokenId>,
    pub cfg: GenerationConfig,
    pub alpha: f64,
}

impl Prepared {
    /// What the request holds while queued or running, counted against
    /// [`Limits::max_queued_tokens`]: `n × (prompt + max_tokens)` (its KV caches).
    pub fn held_tokens(&self) -> usize {
        self.cfg
            .n
            .saturating_mul(self.ids.len().saturating_add(self.cfg.max_tokens))
    }
}

struct Job {
    /// Its share of [`Limits::max_queued_tokens`], given back when it is done.
    cost: Cost,
    ids: Vec<TokenId>,
    cfg: GenerationConfig,
    alpha: f64,
    events: Box<dyn EventSink>,
    deadline: Instant,
}

/// One place in the queue, given back on drop unless the job got into the queue.
struct Waiting(Arc<Gauges>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tokens held by a queued or running job; released on drop (done, skipped or refused).
struct Cost {
    tokens: usize,
    pool: Arc<AtomicUsize>,
}

impl Drop for Cost {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.tokens, Ordering::AcqRel);
    }
}

/// The handle requests go through (cheap to share: `&Engine` from any thread).
pub struct Engine {
    queued_tokens: Arc<AtomicUsize>,
    gauges: Arc<Gauges>,
    tok: Tokenizer,
    context: usize,
    fusion: bool,
    limits: Limits,
    queue: SyncSender<Job>,
}

/// What the worker shares with the handles.
#[derive(Default)]
struct Gauges {
    /// Jobs submitted and not yet taken into the batch (or skipped).
    waiting: AtomicUsize,
    /// Rows in the batch after the last step.
    rows: AtomicUsize,
}

/// The worker's load ([`Engine::load`]).
#[derive(Clone)]
pub struct Load(Arc<Gauges>);

impl Load {
    /// Rows in the running batch after the worker's last step.
    pub fn rows(&self) -> usize {
        self.0.rows.load(Ordering::Acquire)
    }
    /// Requests submitted and not yet in the batch.
    pub fn waiting(&self) -> usize {
        self.0.waiting.load(Ordering::Acquire)
    }
}

/// The worker thread; [`Worker::join`] once every [`Engine`] is dropped.
pub struct Worker(JoinHandle<()>);

impl Worker {
    pub fn join(self) -> Result<()> {
        self.0
            .join()
            .map_err(|_| Error::Input("the serving worker thread panicked".into()))
    }
}

impl Engine {
    /// Starts the worker that owns `target` (and the calibration in `fusion`).
    pub fn start(
        target: Box<dyn CausalLm>,
        tok: Tokenizer,
        fusion: Option<Fusion>,
        limits: Limits,
    ) -> Result<(Engine, Worker)> {
        if limits.queue == 0 {
            return Err(Error::Input("--queue must be at least 1".into()));
        }
        if limits.max_batch < limits.max_n.max(1) || limits.prefill_chunk == 0 {
            return Err(Error::Input(format!(
                "--max-batch ({}) must hold a request of --max-n ({}) samples, and --prefill-chunk must be at least 1",
                limits.max_batch, limits.max_n
            )));
        }
        if !(0.0..=1.0).contains(&limits.default_alpha) {
            return Err(Error::Input(format!(
                "--alpha {} is outside [0, 1]",
                limits.default_alpha
            )));
        }
        let (tx, rx) = sync_channel::<Job>(limits.queue);
        let gauges = Arc::new(Gauges::default());
        let engine = Engine {
            queued_tokens: Arc::new(AtomicUsize::new(0)),
            gauges: gauges.clone(),
            tok: tok.clone(),
            context: target.info().context_length,
            fusion: fusion.is_some(),
            limits: Limits {
                default_alpha: if fusion.is_some() {
                    limits.default_alpha
                } else {
                    0.0
                },
                max_n: limits.max_n.max(1),
                timeout: limits.timeout.max(Duration::from_secs(1)),
                ..limits
            },
            queue: tx,
        };
        let handle = std::thread::Builder::new()
            .name("detoxfuse-worker".into())
            .spawn({
                let limits = engine.limits.clone();
                move || worker(target, tok, fusion, rx, limits, gauges)
            })
            .map_err(|e| Error::Input(format!("cannot start the serving worker: {e}")))?;
        Ok((engine, Worker(handle)))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    /// Whether a calibration is loaded (α > 0 allowed).
    pub fn has_fusion(&self) -> bool {
        self.fusion
    }

    /// The worker's load, readable from anywhere without holding the engine.
    pub fn load(&self) -> Load {
        Load(self.gauges.clone())
    }

    /// Checks `p` and tokenizes `text` (`chat`: special tokens of a chat template allowed;
    /// a default `max_tokens` of what the context leaves, at most 512, else 16).
    pub fn prepare(
        &self,
        p: &Params,
        text: &str,
        chat: bool,
    ) -> std::result::Result<Prepared, Reject> {
        let alpha = p.alpha.unwrap_or(self.limits.default_alpha);
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Reject::invalid(
                format!("alpha {alpha} is outside [0, 1] (0 is the untouched target)"),
                "alpha",
            )
            .code("invalid_value"));
        }
        if alpha > 0.0 && !self.fusion {
            return Err(Reject::invalid(
                "this server runs without a calibration model (--calibration none): only alpha 0",
                "alpha",
            )
            .code("invalid_value"));
        }
        let n = p.n.unwrap_or(1);
        if n == 0 || n > self.limits.max_n {
            return Err(
                Reject::invalid(format!("n must be in 1..={}", self.limits.max_n), "n")
                    .code("invalid_value"),
            );
        }
        let temperature = p.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Reject::invalid(
                "temperature must be in [0, 2]",
                "temperature",
            ));
        }
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Reject::invalid("top_p must be in (0, 1]", "top_p"));
        }
        if p.stop.len() > 4 || p.stop.iter().any(|s| s.is_empty()) {
            return Err(Reject::invalid(
                "stop takes up to 4 non-empty strings",
                "stop",
            ));
        }
        let ids = self
            .tok
            .encode(text, chat)
            .map_err(|e| Reject::invalid(format!("cannot tokenize the prompt: {e}"), "prompt"))?;
        let room = self.context.saturating_sub(ids.len());
        let max_tokens = p
            .max_tokens
            .unwrap_or(if chat { room.min(512) } else { 16 });
        if ids.len().saturating_add(max_tokens) > self.context {
            return Err(Reject {
                kind: RejectKind::ContextLength,
                message: format!(
                    "the prompt is {} tokens and max_tokens {max_tokens}, beyond the model's context of {} tokens",
                    ids.len(),
                    self.context
                ),
                param: Some("max_tokens"),
                code: Some("context_length_exceeded"),
            });
        }
        if n.saturating_mul(max_tokens) > self.limits.max_request_tokens {
            return Err(Reject::invalid(
                format!(
                    "n × max_tokens = {n} × {max_tokens} is beyond this server's {} tokens a request (its --max-request-tokens)",
                    self.limits.max_request_tokens
                ),
                "max_tokens",
            )
            .code("request_too_large"));
        }
        let prepared = Prepared {
            ids,
            cfg: GenerationConfig {
                max_tokens,
                n,
                sampling: SamplingParams {
                    temperature,
                    top_k: 0,
                    top_p,
                    seed: p.seed.unwrap_or(0),
                },
                stop: p.stop.clone(),
                stop_tokens: vec![],
            },
            alpha,
        };
        if prepared.held_tokens() > self.limits.max_queued_tokens {
            return Err(Reject::invalid(
                format!(
                    "n × (prompt + max_tokens) = {n} × ({} + {max_tokens}) is beyond the {} tokens this server holds at once (its --max-queued-tokens)",
                    prepared.ids.len(),
                    self.limits.max_queued_tokens
                ),
                "max_tokens",
            )
            .code("request_too_large"));
        }
        Ok(prepared)
    }

    /// Queues `p`; its events go to `events`. A full queue is refused at once.
    pub fn submit(
        &self,
        p: &Prepared,
        events: Box<dyn EventSink>,
    ) -> std::result::Result<(), Reject> {
        let tokens = p.held_tokens();
        let held = self.queued_tokens.fetch_add(tokens, Ordering::AcqRel) + tokens;
        let cost = Cost {
            tokens,
            pool: self.queued_tokens.clone(),
        };
        let refuse = |kind, message: &str| Reject {
            kind,
            message: message.into(),
            param: None,
            code: None,
        };
        if held > self.limits.max_queued_tokens {
            return Err(refuse(
                RejectKind::Busy,
                "the server is busy (too many tokens queued); retry shortly",
            ));
        }
        let waiting = Waiting(self.gauges.clone());
        if self.gauges.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.queue {
            return Err(refuse(
                RejectKind::Busy,
                "the server is busy (request queue full); retry shortly",
            ));
        }
        let job = Job {
            cost,
            ids: p.ids.clone(),
            cfg: p.cfg.clone(),
            alpha: p.alpha,
            events,
            deadline: Instant::now() + self.limits.timeout,
        };
        match self.queue.try_send(job) {
            Ok(()) => {
                std::mem::forget(waiting); // the worker counts it down when it takes the job
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(refuse(
                RejectKind::Busy,
                "the server is busy (request queue full); retry shortly",
            )),
            Err(TrySendError::Disconnected(_)) => Err(refuse(
                RejectKind::ShuttingDown,
                "the server is shutting down",
            )),
        }
    }
}

/// A job whose rows are in the batch.
struct Running {
    job: Job,
    samples: Samples,
    /// The token each of its rows reads at the next step.
    next: Vec<TokenId>,
}

/// What the worker does besides owning the models: the batch, the jobs in it, the one whose
/// prompt is being read, and the next in line when there was no room for it.
struct Scheduler<'m> {
    dec: FusedDecoder<'m>,
    tok: &'m Tokenizer,
    running: Vec<Running>,
    reading: Option<(Job, Prefill)>,
    next_in_line: Option<Job>,
    max_batch: usize,
    prefill_chunk: usize,
    gauges: Arc<Gauges>,
}

/// Sends `job` its text deltas; `false` once its listener is gone or its time is up.
fn deltas(
    events: &mut Box<dyn EventSink>,
    deadline: Instant,
) -> impl FnMut(usize, &str) -> bool + '_ {
    move |index, text| {
        events.send(JobEvent::Delta {
            index,
            text: text.to_string(),
        }) && Instant::now() <= deadline
    }
}

fn finish(r: Running) {
    let Running {
        mut job, samples, ..
    } = r;
    let deadline = job.deadline;
    let gens = samples.finish(&mut deltas(&mut job.events, deadline));
    drop(job.cost); // its tokens are free before the client hears it is done
    let _ = job.events.send(JobEvent::Done(Ok(gens)));
}

fn fail(mut job: Job, e: &Error) {
    drop(job.cost);
    let _ = job.events.send(JobEvent::Done(Err(format!("{e:#}"))));
}

impl Scheduler<'_> {
    fn idle(&self) -> bool {
        self.running.is_empty() && self.reading.is_none() && self.next_in_line.is_none()
    }

    /// Takes jobs in FIFO order while the batch has room, reading their prompts with up to
    /// `prefill_chunk` tokens of work; a prompt read in full joins the batch. Waits for a job
    /// only when there is nothing else to do. `false` once the queue is closed and idle.
    fn admit(&mut self, jobs: &Receiver<Job>) -> bool {
        let mut budget = self.prefill_chunk;
        loop {
            if self.reading.is_none() {
                let job = match self.next_in_line.take() {
                    Some(j) => j,
                    None if self.idle() => match jobs.recv() {
                        Ok(j) => j,
                        Err(_) => return false,
                    },
                    None => match jobs.try_recv() {
                        Ok(j) => j,
                        Err(_) => return true,
                    },
                };
                if job.events.is_closed() || Instant::now() > job.deadline {
                    self.gauges.waiting.fetch_sub(1, Ordering::AcqRel);
                    continue; // the client is gone or out of time: skip the work
                }
                if self.dec.rows() > 0 && self.dec.rows() + job.cfg.n > self.max_batch {
                    self.next_in_line = Some(job);
                    return true;
                }
                self.gauges.waiting.fetch_sub(1, Ordering::AcqRel);
                let ids = prompt_ids(
                    self.tok,
                    &job.ids,
                    job.cfg.max_tokens,
                    self.dec.context_length(),
                );
                match ids.and_then(|ids| self.dec.begin(&ids, job.alpha)) {
                    Ok(p) => self.reading = Some((job, p)),
                    Err(e) => fail(job, &e),
                }
                continue;
            }
            if budget == 0 {
                return true;
            }
            let Some((_, p)) = self.reading.as_mut() else {
                continue;
            };
            match self.dec.prefill_some(p, budget) {
                Ok(read) => budget -= read.min(budget),
                Err(e) => {
                    let (job, _) = self.reading.take().expect("reading");
                    fail(job, &e);
                    continue;
                }
            }
            if p.remaining() == 0 {
                let (job, p) = self.reading.take().expect("reading");
                self.join(job, p);
            }
        }
    }

    /// Adds a read prompt's rows to the batch and draws their first tokens.
    fn join(&mut self, mut job: Job, p: Prefill) {
        let mut samples = Samples::new(self.tok, &job.cfg);
        if samples.is_done() {
            // max_tokens 0: nothing to decode
            return finish(Running {
                job,
                samples,
                next: Vec::new(),
            });
        }
        let n = job.cfg.n;
        let first = match self.dec.join(p, n) {
            Ok(l) => l,
            Err(e) => return fail(job, &e),
        };
        let start = self.dec.rows() - n;
        let deadline = job.deadline;
        let (keep, next) = samples.draw(
            self.tok,
            &vec![first; n],
            &mut deltas(&mut job.events, deadline),
        );
        if keep.len() < n {
            let rows: Vec<usize> = (0..start).chain(keep.iter().map(|&r| start + r)).collect();
            if let Err(e) = self.dec.retain_rows(&rows) {
                return self.abort(&e);
            }
        }
        let r = Running { job, samples, next };
        if r.samples.is_done() {
            finish(r);
        } else {
            self.running.push(r);
        }
    }

    /// One decode step of every running row; finished, cancelled and timed-out rows leave.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let now = Instant::now();
        for r in &mut self.running {
            if r.job.events.is_closed() || now > r.job.deadline {
                r.samples.cancel();
            }
        }
        let tokens: Vec<TokenId> = self
            .running
            .iter()
            .flat_map(|r| r.next.iter().copied())
            .collect();
        let logits = match self.dec.step(&tokens) {
            Ok(l) => l,
            Err(e) => return self.abort(&e),
        };
        // Every live row's token is drawn in one parallel pass (most jobs have one row).
        let drawn = {
            let mut live = Vec::with_capacity(logits.len());
            let mut samplers = Vec::with_capacity(logits.len());
            let mut rows = logits.into_iter();
            for r in &mut self.running {
                let mine = rows.by_ref().take(r.next.len());
                if r.samples.is_done() {
                    mine.for_each(drop);
                } else {
                    live.extend(mine);
                    samplers.extend(r.samples.samplers());
                }
            }
            sample_rows(&mut samplers, &live)
        };
        let mut drawn = drawn.into_iter();
        let mut keep = Vec::with_capacity(tokens.len());
        let mut offset = 0;
        let mut still = Vec::with_capacity(self.running.len());
        for mut r in std::mem::take(&mut self.running) {
            let rows = r.next.len();
            if !r.samples.is_done() {
                let mine: Vec<TokenId> = drawn.by_ref().take(rows).collect();
                let deadline = r.job.deadline;
                let (k, next) =
                    r.samples
                        .take(self.tok, &mine, &mut deltas(&mut r.job.events, deadline));
                keep.extend(k.iter().map(|&i| offset + i));
                r.next = next;
            }
            offset += rows;
            if r.samples.is_done() {
                finish(r);
            } else {
                still.push(r);
            }
        }
        self.running = still;
        if keep.len() < tokens.len() {
            if let Err(e) = self.dec.retain_rows(&keep) {
                self.abort(&e);
            }
        }
    }

    /// Something went wrong inside the batch: every job in it ends with the error.
    fn abort(&mut self, e: &Error) {
        for r in std::mem::take(&mut self.running) {
            fail(r.job, e);
        }
        let _ = self.dec.retain_rows(&[]);
    }
}

/// Runs jobs until every sender of the queue is gone and the last job is done.
fn worker(
    target: Box<dyn CausalLm>,
    tok: Tokenizer,
    fusion: Option<Fusion>,
    jobs: Receiver<Job>,
    limits: Limits,
    gauges: Arc<Gauges>,
) {
    let dec = match &fusion {
        Some(f) => match f.decoder(target.as_ref(), &tok, 0.0) {
            Ok(d) => d,
            Err(e) => {
                // Engine::start checked the pair; answer every job with the reason anyway.
                while let Ok(job) = jobs.recv() {
                    fail(job, &e);
                }
                return;
            }
        },
        None => FusedDecoder::plain(target.as_ref()),
    };
    let mut s = Scheduler {
        dec,
        tok: &tok,
        running: Vec::new(),
        reading: None,
        next_in_line: None,
        max_batch: limits.max_batch,
        prefill_chunk: limits.prefill_chunk,
        gauges,
    };
    while s.admit(&jobs) {
        s.step();
        s.gauges.rows.store(s.dec.rows(), Ordering::Release);
    }
}

/// The `clap` flags of [`Limits`] default to `Limits::default()` (the timeout's default is
/// written as text for its parser, so this keeps the two from drifting). Runs where the
/// feature is on: `cargo test --workspace`, as `scripts/test.sh` does.
#[cfg(all(test, feature = "clap"))]
mod clap_tests {
    use super::*;

    #[test]
    fn the_limit_flags_default_to_limits_default() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            l: Limits,
        }
        let l = <Serve as clap::Parser>::try_parse_from(["serve"])
            .unwrap()
            .l;
        let d = Limits::default();
        assert_eq!(
            (l.queue, l.timeout, l.max_n, l.default_alpha),
            (d.queue, d.timeout, d.max_n, d.default_alpha)
        );
        assert_eq!(
            (l.max_request_tokens, l.max_queued_tokens),
            (d.max_request_tokens, d.max_queued_tokens)
        );
    }
}
