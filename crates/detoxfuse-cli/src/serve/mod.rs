//! `detoxfuse serve`: an OpenAI-compatible HTTP server with per-request fusion strength,
//! around the library's serving engine ([`detoxfuse::serving`]: one worker, a bounded
//! queue, cancellation). Here: axum routes, auth, the wire types and server-sent events.

pub mod load;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use detoxfuse::align::Variant;
use detoxfuse::generate::Generation;
use detoxfuse::lm;
use detoxfuse::openai::{self, ApiError, Endpoint, Reply};
use detoxfuse::serving::{Engine, EventSink, JobEvent, Limits};
use detoxfuse::text::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

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
    #[arg(long, value_enum, default_value_t = Variant::Hidden)]
    align_variant: Variant,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Seconds a client may take to send a request's headers, and again its body; the
    /// connection is closed beyond (slow or idle clients cannot hold the server).
    #[arg(long, default_value_t = 10)]
    read_timeout: u64,
    #[command(flatten)]
    limits: Limits,
    /// Name the model is served under (default: the --model argument).
    #[arg(long)]
    served_name: Option<String>,
}

struct AppState {
    engine: Engine,
    max_body: usize,
    /// For the headers (hyper's timer) and for the body (the handlers).
    read_timeout: Duration,
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
            a.limits.default_alpha,
            a.align_variant,
        )?),
    };
    let (engine, worker) = Engine::start(target, tok, fusion, a.limits.clone())?;
    let state = Arc::new(AppState {
        engine,
        max_body: a.max_body,
        read_timeout: Duration::from_secs(a.read_timeout.max(1)),
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
        let read_timeout = state.read_timeout;
        let app = router(state);
        accept_loop(listener, app, read_timeout, shutdown).await;
        eprintln!("detoxfuse serve: shut down (in-flight requests finished)");
        anyhow::Ok(())
    })?;
    // the router (and with it the last queue sender) is gone: the worker ends
    worker.join()?;
    Ok(())
}

/// Serves connections until `shutdown`, then lets the open ones finish. Unlike
/// `axum::serve` it gives hyper a timer, so that a client that does not send its headers
/// within `read_timeout` is disconnected, and the handlers read bodies within it too.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // out of descriptors, a reset before accept: keep serving the others
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    graceful.shutdown().await;
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

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async {
            error(
                ApiError::invalid(
                    "no such route: see /v1/models, /v1/completions, /v1/chat/completions, /health",
                    None,
                )
                .status(404)
                .with_code("not_found"),
            )
        })
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
            .status(401)
            .with_code("invalid_api_key")
            .kind("authentication_error");
            return error(e);
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

/// An OpenAI-style error response (with `retry-after` when the client should retry).
fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.is_busy() {
        r.headers_mut()
            .insert("retry-after", header::HeaderValue::from_static("1"));
    }
    r
}

async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let body = read_body(body, st.max_body, st.read_timeout).await;
    respond(st, Endpoint::Completion, body).await
}

async fn chat(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let body = read_body(body, st.max_body, st.read_timeout).await;
    respond(st, Endpoint::Chat, body).await
}

/// The whole body, at most `limit` bytes, within `timeout`.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::invalid(
            "the request body did not arrive in time (see the server's --read-timeout)",
            None,
        )
        .status(408)),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ApiError::invalid("request body too large (see the server's --max-body)", None)
                    .status(413)
            } else {
                ApiError::invalid(format!("could not read the request body: {e}"), None)
            })
        }
        Ok(Ok(b)) => Ok(b),
    }
}

/// Parses, validates and queues a request, then answers it whole or as a stream.
async fn respond(st: Arc<AppState>, endpoint: Endpoint, body: Result<Bytes, ApiError>) -> Response {
    let queued = (|| {
        let bytes = body?;
        let r = openai::parse_request(endpoint, &bytes, &st.model_id, st.engine.tokenizer())?;
        let p = st
            .engine
            .prepare(&r.common.params(), &r.text, endpoint == Endpoint::Chat)?;
        let (tx, rx) = unbounded_channel();
        st.engine.submit(&p, Box::new(Sink(tx)))?;
        Ok::<_, ApiError>((r, p, rx))
    })();
    let (r, p, rx) = match queued {
        Ok(x) => x,
        Err(e) => return error(e),
    };
    let serial = st.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply::new(endpoint, serial, now_unix(), &st.model_id, p.ids.len());
    if r.common.stream {
        return stream(st.engine.limits().timeout, rx, reply, p.cfg.n).into_response();
    }
    match finished(&st, rx).await {
        Ok(gens) => Json(reply.whole(&gens, p.alpha)).into_response(),
        Err(e) => error(e),
    }
}

/// Waits for a job's result (non-streaming), within the request timeout.
async fn finished(
    st: &AppState,
    mut rx: UnboundedReceiver<JobEvent>,
) -> Result<Vec<Generation>, ApiError> {
    let wait = async {
        while let Some(ev) = rx.recv().await {
            if let JobEvent::Done(r) = ev {
                return r.map_err(ApiError::server);
            }
        }
        Err(ApiError::server("the worker dropped the request"))
    };
    tokio::time::timeout(st.engine.limits().timeout, wait)
        .await
        .unwrap_or_else(|_| Err(ApiError::timeout()))
}

/// Server-sent events: one chunk per text delta, a final chunk per choice with its
/// finish_reason (and usage), then `[DONE]`.
fn stream(
    timeout: Duration,
    mut rx: UnboundedReceiver<JobEvent>,
    reply: Reply,
    n: usize,
) -> impl IntoResponse {
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        for c in reply.opening(n) {
            if !send(c).await {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    let _ = send(ApiError::timeout().body()).await;
                    break;
                }
            };
            match ev {
                JobEvent::Delta { index, text } => {
                    if !send(reply.chunk(index, Some(&text), None)).await {
                        return; // client gone: dropping rx cancels the job
                    }
                }
                JobEvent::Done(Ok(gens)) => {
                    for c in reply.closing(&gens) {
                        if !send(c).await {
                            return;
                        }
                    }
                    break;
                }
                JobEvent::Done(Err(msg)) => {
                    let _ = send(ApiError::server(msg).body()).await;
                    break;
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}
