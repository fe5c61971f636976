//! Library errors. Every variant names the thing that is wrong and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path} not found: run `detoxfuse fetch` or pass the path of an existing .gguf / model directory")]
    ModelNotFound { path: PathBuf },

    #[error(
        "{path} is not a usable GGUF file: {reason}. Re-download it with `detoxfuse fetch --force`"
    )]
    BadGguf { path: PathBuf, reason: String },

    #[error("{path}: architecture `{arch}` is not supported (supported: {supported}). Use a llama-family or gemma3 model")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },

    #[error("{path}: metadata key `{key}` {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },

    #[error("model directory {path}: {reason}")]
    BadModelDir { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("prompt is {tokens} tokens plus {requested} to generate, but the model's context is {context} tokens: shorten the prompt or lower --max-tokens")]
    ContextOverflow {
        tokens: usize,
        requested: usize,
        context: usize,
    },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("fetch: {0}")]
    Fetch(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a human description ("reading /x/y.gguf") to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// An error and its causes as one line, each cause once (the library's I/O errors already end
/// with their cause, which walking the chain would print a second time), followed, for a full
/// disk, by what to do about it.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut disk_full = false;
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        disk_full |= c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull);
        cause = c.source();
    }
    if disk_full {
        out.push_str("\nthe disk is full: free some space and run the same command again; what was finished is kept and the work continues from there");
    }
    out
}
