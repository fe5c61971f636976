//! OpenAI API shapes: requests, responses, stream chunks and error objects.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use detoxfuse::generate::FinishReason;
use detoxfuse::text::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
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
        let content = match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    _ => Err(ApiError::invalid(
                        "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        Some("messages"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            Value::Null => String::new(),
            _ => {
                return Err(ApiError::invalid(
                    "message content must be a string or a list of text parts",
                    Some("messages"),
                ))
            }
        };
        if !["system", "user", "assistant", "developer"].contains(&self.role.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "unsupported role {:?}: use system, user or assistant",
                    self.role
                ),
                Some("messages"),
            ));
        }
        let role = if self.role == "developer" {
            "system".into()
        } else {
            self.role.clone()
        };
        Ok(ChatMessage { role, content })
    }
}

pub fn finish(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
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
        assert_eq!(r.prompt.into_vec(), vec!["hi"]);
        assert_eq!(r.common.stop.unwrap().into_vec(), vec!["\n"]);
        assert_eq!(r.common.alpha, Some(0.3));
        let c: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        }))
        .unwrap();
        assert_eq!(c.messages[0].to_chat().unwrap().content, "ab");
        let bad = InMessage {
            role: "tool".into(),
            content: json!("x"),
        };
        assert_eq!(bad.to_chat().unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let e = ApiError::invalid("bad alpha", Some("alpha")).with_code("invalid_value");
        let b = e.body();
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "alpha");
        assert_eq!(b["error"]["code"], "invalid_value");
    }
}
