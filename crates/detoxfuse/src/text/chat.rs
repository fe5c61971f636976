//! Chat templates: ChatML (SmolLM2) and Gemma's turns, detected from the vocabulary.

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n`; SmolLM2's template adds its default system
    /// prompt when the conversation has none.
    ChatMl,
    /// `<start_of_turn>user\ncontent<end_of_turn>\n`, assistant role named `model`, a system
    /// message folded into the first user turn.
    Gemma,
}

/// SmolLM2-Instruct's template inserts this when the first message is not a system message.
const SMOLLM_DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

impl ChatTemplate {
    pub fn detect(pieces: &[String]) -> Option<Self> {
        if pieces.iter().any(|p| p == "<|im_start|>") {
            Some(Self::ChatMl)
        } else if pieces.iter().any(|p| p == "<start_of_turn>") {
            Some(Self::Gemma)
        } else {
            None
        }
    }

    pub fn end_of_turn(&self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_end|>",
            Self::Gemma => "<end_of_turn>",
        }
    }

    /// Renders the messages and opens the assistant's turn (BOS is the tokenizer's job).
    pub fn render(&self, messages: &[ChatMessage]) -> String {
        let mut s = String::new();
        match self {
            Self::ChatMl => {
                if messages.first().is_none_or(|m| m.role != "system") {
                    s.push_str(&format!(
                        "<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n"
                    ));
                }
                for m in messages {
                    s.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role, m.content
                    ));
                }
                s.push_str("<|im_start|>assistant\n");
            }
            Self::Gemma => {
                let mut system: Option<&str> = None;
                for m in messages {
                    match m.role.as_str() {
                        "system" => system = Some(&m.content),
                        role => {
                            let role = if role == "assistant" { "model" } else { role };
                            let content = match system.take() {
                                Some(sys) => format!("{sys}\n\n{}", m.content),
                                None => m.content.clone(),
                            };
                            s.push_str(&format!("<start_of_turn>{role}\n{content}<end_of_turn>\n"));
                        }
                    }
                }
                s.push_str("<start_of_turn>model\n");
            }
        }
        s
    }
}
