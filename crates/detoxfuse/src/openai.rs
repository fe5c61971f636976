//! The OpenAI wire format around [`crate::serving`], without HTTP: request bodies parsed and
//! checked ([`parse_request`]), the engine's refusals as OpenAI error objects ([`ApiError`]),
//! and the JSON of answers and stream chunks ([`Reply`]). `detoxfuse serve` puts axum,
//! authentication and server-sent events around it; the fuzz target of the request path calls
//! [`parse_request`] directly.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::generate::{FinishReason, Generation};
use crate::serving::{Params, Reject, RejectKind};
use crate::text::{ChatMessage, Tokenizer};

/// An OpenAI-style error: an HTTP status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// A 500 `server_error`.
    pub fn server(message: impl Into<String>) -> Self {
        Self::invalid(message, None)
            .status(500)
            .kind("server_error")
    }

    /// A 504: the request ran past the server's timeout.
    pub fn timeout() -> Self {
        Self::invalid("the request timed out (see the server's --timeout)", None)
            .status(504)
            .kind("timeout")
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Whether the client should retry shortly (429, 503: send `retry-after`).
    pub fn is_busy(&self) -> bool {
        matches!(self.status, 429 | 503)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<Reject> for ApiError {
    fn from(r: Reject) -> Self {
        let e = ApiError::invalid(r.message, r.param);
        let e = match r.code {
            Some(c) => e.with_code(c),
            None => e,
        };
        match r.kind {
            RejectKind::Invalid | RejectKind::ContextLength => e,
            RejectKind::Busy => e
                .status(429)
                .with_code("queue_full")
                .kind("rate_limit_error"),
            RejectKind::ShuttingDown => e.status(503).kind("server_error"),
        }
    }
}

/// A string or a list of strings (OpenAI accepts both for `prompt` and `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Sampling fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients
/// send fields this server does not use.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<usize>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    /// Extension: fusion strength in [0, 1] (0 = the untouched target).
    pub alpha: Option<f64>,
}

impl Common {
    /// The engine's parameters (it checks their ranges).
    pub fn params(&self) -> Params {
        Params {
            alpha: self.alpha,
            n: self.n,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self
                .stop
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            seed: self.seed,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<InMessage>,
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message; `content` may be a string or a list of `{"type": "text", "text": ...}`.
#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Value,
}

impl InMessage {
    pub fn to_chat(&self) -> Result<ChatMessage, ApiError> {
        let bad = |m: &str| ApiError::invalid(m, Some("messages"));
        let content = match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    _ => Err(bad(
                        "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            Value::Null => String::new(),
            _ => return Err(bad("message content must be a string or a list of text parts")),
        };
        let role = match self.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            r => {
                return Err(bad(&format!(
                    "unsupported role {r:?}: use system, user or assistant"
                )))
            }
        };
        Ok(ChatMessage {
            role: role.into(),
            content,
        })
    }
}

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`: a raw prompt.
    Completion,
    /// `POST /v1/chat/completions`: messages through the model's chat template.
    Chat,
}

/// A parsed request: the text to continue and its sampling fields.
#[derive(Debug, Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    /// The prompt, or the chat messages rendered by the chat template.
    pub text: String,
    pub common: Common,
}

/// Parses a request body for `endpoint`, for the model served as `served`. Every failure is
/// a 4xx [`ApiError`] that says what is wrong: invalid JSON, a missing or mistyped field, an
/// unknown model (404: a request can only name the model this server has loaded), more than
/// one prompt, empty messages, a role or content part this server does not take, a chat
/// template the model lacks. Ranges (α, n, max_tokens against the context) are the engine's
/// to check ([`crate::serving::Engine::prepare`]).
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    served: &str,
    tok: &Tokenizer,
) -> Result<Request, ApiError> {
    let json_error = |e: serde_json::Error| {
        ApiError::invalid(format!("invalid JSON body: {e}"), None).with_code("invalid_json")
    };
    let (text, common) = match endpoint {
        Endpoint::Completion => {
            let r: CompletionRequest = serde_json::from_slice(body).map_err(json_error)?;
            let mut prompts = r.prompt.into_vec();
            if prompts.len() != 1 {
                return Err(ApiError::invalid(
                    "send one prompt per request",
                    Some("prompt"),
                ));
            }
            (prompts.remove(0), r.common)
        }
        Endpoint::Chat => {
            let r: ChatRequest = serde_json::from_slice(body).map_err(json_error)?;
            if r.messages.is_empty() {
                return Err(ApiError::invalid(
                    "messages must not be empty",
                    Some("messages"),
                ));
            }
            let msgs = r
                .messages
                .iter()
                .map(InMessage::to_chat)
                .collect::<Result<Vec<_>, _>>()?;
            let text = tok.apply_chat(&msgs).map_err(|e| {
                ApiError::invalid(
                    format!("cannot apply the chat template: {e}"),
                    Some("messages"),
                )
            })?;
            (text, r.common)
        }
    };
    if common.model != served {
        return Err(ApiError::invalid(
            format!(
                "model {:?} is not served here; GET /v1/models lists {served:?}",
                common.model
            ),
            Some("model"),
        )
        .status(404)
        .with_code("model_not_found"));
    }
    Ok(Request {
        endpoint,
        text,
        common,
    })
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
}

/// The JSON of one answer: a whole response, or the chunks of a stream.
#[derive(Debug, Clone)]
pub struct Reply {
    pub endpoint: Endpoint,
    /// `cmpl-N` or `chatcmpl-N`.
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: usize,
}

impl Reply {
    pub fn new(
        endpoint: Endpoint,
        serial: u64,
        created: u64,
        model: &str,
        prompt_tokens: usize,
    ) -> Self {
        let id = match endpoint {
            Endpoint::Completion => format!("cmpl-{serial}"),
            Endpoint::Chat => format!("chatcmpl-{serial}"),
        };
        Self {
            endpoint,
            id,
            created,
            model: model.to_string(),
            prompt_tokens,
        }
    }

    /// The non-streaming response (with the α used, an extension field).
    pub fn whole(&self, gens: &[Generation], alpha: f64) -> Value {
        let choices: Vec<Value> = gens
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let finish = finish_reason(g.finish_reason);
                match self.endpoint {
                    Endpoint::Completion => json!({"text": g.text, "index": i, "logprobs": null,
                                                   "finish_reason": finish}),
                    Endpoint::Chat => json!({"index": i, "logprobs": null, "finish_reason": finish,
                                             "message": {"role": "assistant", "content": g.text}}),
                }
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        let completion: usize = gens.iter().map(|g| g.token_ids.len()).sum();
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices, "usage": usage(self.prompt_tokens, completion), "alpha": alpha,
        })
    }

    /// A stream chunk for choice `index`: a text delta, or (`text` None) an empty one,
    /// carrying `finish` when the choice ends.
    pub fn chunk(&self, index: usize, text: Option<&str>, finish: Option<&str>) -> Value {
        let (object, choice) = match self.endpoint {
            Endpoint::Completion => (
                "text_completion",
                json!({"text": text.unwrap_or(""), "index": index, "logprobs": null,
                       "finish_reason": finish}),
            ),
            Endpoint::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                (
                    "chat.completion.chunk",
                    json!({"index": index, "delta": delta, "logprobs": null,
                           "finish_reason": finish}),
                )
            }
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice]})
    }

    /// The chunks that open a stream: for chat, each choice's assistant role.
    pub fn opening(&self, n: usize) -> Vec<Value> {
        if self.endpoint != Endpoint::Chat {
            return Vec::new();
        }
        (0..n)
            .map(|i| {
                let mut c = self.chunk(i, None, None);
                c["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                c
            })
            .collect()
    }

    /// The chunks that close a stream: each choice's finish reason, the last with usage.
    pub fn closing(&self, gens: &[Generation]) -> Vec<Value> {
        let completion: usize = gens.iter().map(|g| g.token_ids.len()).sum();
        gens.iter()
            .enumerate()
            .map(|(i, g)| {
                let mut c = self.chunk(i, None, Some(finish_reason(g.finish_reason)));
                if i + 1 == gens.len() {
                    c["usage"] = usage(self.prompt_tokens, completion);
                }
                c
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_openai_shapes() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": ["hi"], "stop": "\n", "max_tokens": 5, "alpha": 0.3,
            "user": "ignored", "logit_bias": {}
        }))
        .unwrap();
        assert_eq!(r.common.params().stop, vec!["\n"]);
        assert_eq!(r.common.params().alpha, Some(0.3));
        assert_eq!(r.common.params().max_tokens, Some(5));
        assert_eq!(r.prompt.into_vec(), vec!["hi"]);
        let c: ChatRequest = serde_json::from_value(json!({
            "model": "m", "max_completion_tokens": 3, "max_tokens": 9,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        }))
        .unwrap();
        assert_eq!(c.messages[0].to_chat().unwrap().content, "ab");
        // the newer name wins
        assert_eq!(c.common.params().max_tokens, Some(3));
        let bad = InMessage {
            role: "tool".into(),
            content: json!("x"),
        };
        assert_eq!(bad.to_chat().unwrap_err().status, 400);
        let dev = InMessage {
            role: "developer".into(),
            content: Value::Null,
        };
        assert_eq!(dev.to_chat().unwrap().role, "system");
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let e = ApiError::invalid("bad alpha", Some("alpha")).with_code("invalid_value");
        let b = e.body();
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "alpha");
        assert_eq!(b["error"]["code"], "invalid_value");
        let busy = ApiError::from(Reject {
            kind: RejectKind::Busy,
            message: "full".into(),
            param: None,
            code: None,
        });
        assert_eq!((busy.status, busy.code), (429, Some("queue_full")));
        assert!(busy.is_busy() && !e.is_busy());
    }

    #[test]
    fn replies_have_the_openai_shape() {
        let g = Generation {
            text: "hi".into(),
            token_ids: vec![1, 2],
            finish_reason: FinishReason::Length,
        };
        let chat = Reply::new(Endpoint::Chat, 7, 1, "m", 5);
        let w = chat.whole(std::slice::from_ref(&g), 0.2);
        assert_eq!(w["id"], "chatcmpl-7");
        assert_eq!(w["choices"][0]["message"]["content"], "hi");
        assert_eq!(w["usage"]["total_tokens"], 7);
        assert_eq!(chat.opening(2).len(), 2);
        assert_eq!(
            chat.chunk(0, Some("x"), None)["choices"][0]["delta"]["content"],
            "x"
        );
        let end = chat.closing(&[g.clone(), g]);
        assert!(end[0].get("usage").is_none());
        assert_eq!(end[1]["usage"]["completion_tokens"], 4);
        assert_eq!(end[1]["choices"][0]["finish_reason"], "length");
        let cmpl = Reply::new(Endpoint::Completion, 1, 1, "m", 5);
        assert!(cmpl.opening(3).is_empty());
        assert_eq!(cmpl.chunk(0, None, Some("stop"))["choices"][0]["text"], "");
    }
}
