//! `detoxfuse serve`: an OpenAI-compatible HTTP server with per-request fusion strength,
//! around the library's serving engine ([`detoxfuse::serving`]: one worker, a bounded
//! queue, cancellation). Here: axum routes, auth, the wire types and server-sent events.

pub mod api;
pub mod load;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use detoxfuse::generate::Generation;
use detoxfuse::lm;
use detoxfuse::serving::{
    Engine, EventSink, JobEvent, Limits, Params, Prepared, Reject, RejectKind,
};
use detoxfuse::text::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use api::{ApiError, ChatRequest, Common, CompletionRequest};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The target model: a .gguf file, a Hugging Face directory or a fetched name.
    #[command(flatten)]
    model: crate::ModelArg,
    /// Address to bind (loopback by default: put a reverse proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/ routes.
    #[arg(long, env = "DETOXFUSE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Calibration to fuse: "default" (the shipped fusion-aware calibration, no training), "fused" (the one
    /// `calibrate --recipe fused` trains here, on first use), "paper" (the paper recipe's model,
    /// trained on first use), or a directory, or "none" to serve the plain target
    /// only (alpha 0).
    #[arg(long, default_value = "default")]
    calibration: String,
    /// Alignment from `detoxfuse align` (default: the one beside the calibration model).
    #[arg(long)]
    alignment: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value_t = crate::align::VariantArg::Hidden)]
    align_variant: crate::align::VariantArg,
    /// Fusion strength used when a request does not send `alpha`.
    #[arg(long, default_value_t = 0.2)]
    alpha: f64,
    /// Requests waiting for the model beyond the one running; more get 429 at once.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Seconds a request may take, queueing included (504 beyond; the job is cancelled).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Most samples per request (`n`).
    #[arg(long, default_value_t = 16)]
    max_n: usize,
    /// Name the model is served under (default: the --model argument).
    #[arg(long)]
    served_name: Option<String>,
}

struct AppState {
    engine: Engine,
    model_id: String,
    api_key: Option<String>,
    created: u64,
    next_id: AtomicU64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A job's events into the handler's channel.
struct Sink(UnboundedSender<JobEvent>);

impl EventSink for Sink {
    fn send(&mut self, e: JobEvent) -> bool {
        self.0.send(e).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub fn run(cache: &Path, a: ServeArgs) -> Result<()> {
    serve_until(cache, a, shutdown_signal(), |_| {})
}

/// Serves until `shutdown` resolves (then finishes the requests in flight), calling
/// `bound(address)` once the socket listens.
pub fn serve_until(
    cache: &Path,
    a: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let path = a.model.resolve(cache)?;
    let target = lm::load(&path)?;
    let tok = Tokenizer::for_model(&path)?;
    let fusion = match a.calibration.as_str() {
        "none" => None,
        c => Some(crate::align::load_fusion(
            cache,
            c,
            a.alignment.as_deref(),
            &path,
            target.as_ref(),
            a.alpha,
            a.align_variant.into(),
        )?),
    };
    let (engine, worker) = Engine::start(
        target,
        tok,
        fusion,
        Limits {
            queue: a.queue,
            timeout: Duration::from_secs(a.timeout),
            max_n: a.max_n,
            default_alpha: a.alpha,
        },
    )?;
    let state = Arc::new(AppState {
        engine,
        model_id: a
            .served_name
            .clone()
            .unwrap_or_else(|| a.model.model.clone()),
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        created: now_unix(),
        next_id: AtomicU64::new(1),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", a.host, a.port)
            .parse()
            .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound_addr = listener.local_addr()?;
        println!(
            "detoxfuse serve: listening on http://{bound_addr} (model {:?}, alpha {} by default, {})",
            state.model_id,
            state.engine.limits().default_alpha,
            if state.api_key.is_some() {
                "bearer token required"
            } else {
                "no auth"
            }
        );
        use std::io::Write;
        std::io::stdout().flush().ok();
        bound(bound_addr);
        let app = router(state, a.max_body);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving")?;
        eprintln!("detoxfuse serve: shut down (in-flight requests finished)");
        anyhow::Ok(())
    })?;
    // the router (and with it the last queue sender) is gone: the worker ends
    worker.join()?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async {
            ApiError::invalid(
                "no such route: see /v1/models, /v1/completions, /v1/chat/completions, /health",
                None,
            )
            .status(StatusCode::NOT_FOUND)
            .with_code("not_found")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| constant_time_eq(k.as_bytes(), key.as_bytes()));
        if !ok {
            let e = ApiError::invalid(
                "missing or wrong API key: send Authorization: Bearer <key>",
                None,
            )
            .status(StatusCode::UNAUTHORIZED)
            .with_code("invalid_api_key")
            .kind("authentication_error");
            return e.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "model": st.model_id, "fusion": st.engine.has_fusion()}))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.model_id, "object": "model", "created": st.created, "owned_by": "detoxfuse",
    }]}))
}

/// Parses a JSON body, mapping every failure to an OpenAI-style 4xx.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large (see the server's --max-body)".to_string()
        } else {
            format!("could not read the request body: {e}")
        };
        ApiError::invalid(msg, None).status(status)
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(format!("invalid JSON body: {e}"), None).with_code("invalid_json")
    })
}

/// The engine's refusal as an OpenAI-style error.
fn api_error(r: Reject) -> ApiError {
    let e = ApiError::invalid(r.message, r.param);
    let e = match r.code {
        Some(c) => e.with_code(c),
        None => e,
    };
    match r.kind {
        RejectKind::Invalid | RejectKind::ContextLength => e,
        RejectKind::Busy => e
            .status(StatusCode::TOO_MANY_REQUESTS)
            .with_code("queue_full")
            .kind("rate_limit_error"),
        RejectKind::ShuttingDown => e
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .kind("server_error"),
    }
}

/// Validates a request for the one model served here and queues it.
fn submit(
    st: &AppState,
    c: &Common,
    text: &str,
    chat: bool,
) -> Result<(Prepared, UnboundedReceiver<JobEvent>), ApiError> {
    if c.model != st.model_id {
        return Err(ApiError::invalid(
            format!(
                "model {:?} is not served here; GET /v1/models lists {:?}",
                c.model, st.model_id
            ),
            Some("model"),
        )
        .status(StatusCode::NOT_FOUND)
        .with_code("model_not_found"));
    }
    let params = Params {
        alpha: c.alpha,
        n: c.n,
        temperature: c.temperature,
        top_p: c.top_p,
        stop: c.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        seed: c.seed,
        max_tokens: c.max_completion_tokens.or(c.max_tokens),
    };
    let p = st.engine.prepare(&params, text, chat).map_err(api_error)?;
    let (tx, rx) = unbounded_channel();
    st.engine
        .submit(&p, Box::new(Sink(tx)))
        .map_err(api_error)?;
    Ok((p, rx))
}

fn server_error(msg: String) -> ApiError {
    ApiError::invalid(msg, None)
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .kind("server_error")
}

/// Waits for a job's result (non-streaming), within the request timeout.
async fn finished(
    st: &AppState,
    mut rx: UnboundedReceiver<JobEvent>,
) -> Result<Vec<Generation>, ApiError> {
    let wait = async {
        while let Some(ev) = rx.recv().await {
            if let JobEvent::Done(r) = ev {
                return r.map_err(server_error);
            }
        }
        Err(server_error("the worker dropped the request".into()))
    };
    tokio::time::timeout(st.engine.limits().timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(
                ApiError::invalid("the request timed out (see the server's --timeout)", None)
                    .status(StatusCode::GATEWAY_TIMEOUT)
                    .kind("timeout"),
            )
        })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r: CompletionRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompts = r.prompt.into_vec();
    if prompts.len() != 1 {
        return ApiError::invalid("send one prompt per request", Some("prompt")).into_response();
    }
    respond(st, &r.common, &prompts[0], Kind::Completion).await
}

async fn chat(
    State(st): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r: ChatRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if r.messages.is_empty() {
        return ApiError::invalid("messages must not be empty", Some("messages")).into_response();
    }
    let msgs = match r
        .messages
        .iter()
        .map(|m| m.to_chat())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let text = match st.engine.tokenizer().apply_chat(&msgs) {
        Ok(t) => t,
        Err(e) => {
            return ApiError::invalid(
                format!("cannot apply the chat template: {e}"),
                Some("messages"),
            )
            .into_response()
        }
    };
    respond(st, &r.common, &text, Kind::Chat).await
}

async fn respond(st: Arc<AppState>, c: &Common, text: &str, kind: Kind) -> Response {
    let (p, rx) = match submit(&st, c, text, kind == Kind::Chat) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let serial = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{serial}"),
        Kind::Chat => format!("chatcmpl-{serial}"),
    };
    let created = now_unix();
    if c.stream {
        return stream(st, rx, id, created, kind, p.cfg.n, p.ids.len()).into_response();
    }
    let gens = match finished(&st, rx).await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let completion_tokens: usize = gens.iter().map(|g| g.token_ids.len()).sum();
    let choices: Vec<Value> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| match kind {
            Kind::Completion => json!({"text": g.text, "index": i, "logprobs": null,
                                       "finish_reason": api::finish(g.finish_reason)}),
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": g.text},
                                 "logprobs": null, "finish_reason": api::finish(g.finish_reason)}),
        })
        .collect();
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    Json(json!({
        "id": id, "object": object, "created": created, "model": st.model_id,
        "choices": choices, "usage": api::usage(p.ids.len(), completion_tokens),
        "alpha": p.alpha,
    }))
    .into_response()
}

/// Server-sent events: one chunk per text delta, a final chunk per choice with its
/// finish_reason (and usage), then `[DONE]`.
fn stream(
    st: Arc<AppState>,
    mut rx: UnboundedReceiver<JobEvent>,
    id: String,
    created: u64,
    kind: Kind,
    n: usize,
    prompt_tokens: usize,
) -> impl IntoResponse {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    let model = st.model_id.clone();
    let timeout = st.engine.limits().timeout;
    tokio::spawn(async move {
        let object = match kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let chunk = |index: usize, text: Option<&str>, finish: Option<&str>| -> Value {
            let choice = match kind {
                Kind::Completion => json!({"text": text.unwrap_or(""), "index": index,
                                           "logprobs": null, "finish_reason": finish}),
                Kind::Chat => {
                    let delta = match text {
                        Some(t) => json!({"content": t}),
                        None => json!({}),
                    };
                    json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
            };
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if kind == Kind::Chat {
            for i in 0..n {
                let mut c = chunk(i, None, None);
                c["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                if !send(c).await {
                    return;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    let e = ApiError::invalid(
                        "the request timed out (see the server's --timeout)",
                        None,
                    );
                    let _ = send(e.body()).await;
                    break;
                }
            };
            match ev {
                JobEvent::Delta { index, text } => {
                    if !send(chunk(index, Some(&text), None)).await {
                        return; // client gone: dropping rx cancels the job
                    }
                }
                JobEvent::Done(Ok(gens)) => {
                    let completion: usize = gens.iter().map(|g| g.token_ids.len()).sum();
                    for (i, g) in gens.iter().enumerate() {
                        let mut c = chunk(i, None, Some(api::finish(g.finish_reason)));
                        if kind == Kind::Completion {
                            c["choices"][0]["text"] = json!("");
                        }
                        if i + 1 == gens.len() {
                            c["usage"] = api::usage(prompt_tokens, completion);
                        }
                        if !send(c).await {
                            return;
                        }
                    }
                    break;
                }
                JobEvent::Done(Err(msg)) => {
                    let _ = send(server_error(msg).body()).await;
                    break;
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}
