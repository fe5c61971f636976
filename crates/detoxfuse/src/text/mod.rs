//! Tokenizers built from GGUF metadata or a Hugging Face tokenizer.json, with special tokens
//! and chat templates.
//!
//! Encoding follows llama.cpp: the text is first partitioned on special tokens (longest
//! first; control tokens only when `parse_special`, user-defined tokens always), then every
//! plain fragment is encoded by the vocabulary's model: byte-level BPE (SmolLM2, `gpt2` in
//! GGUF) or score-merged SentencePiece with byte fallback (Gemma, `llama` in GGUF).

mod bpe;
mod chat;
mod spm;
/// A token id in some model's vocabulary.
pub type TokenId = u32;

pub mod vocab;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values.
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Which kind of vocabulary a tokenizer has; decides how pieces are normalised (`Ġ` vs `▁`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VocabKind {
    /// GPT-2 style byte-level BPE: pieces are bytes mapped to printable characters.
    ByteLevelBpe,
    /// SentencePiece: `▁` marks a space, `<0xNN>` pieces are raw bytes.
    SentencePiece,
}

#[derive(Clone)]
enum Model {
    Bpe(Box<bpe::ByteLevelBpe>),
    Spm(Box<spm::Spm>),
}

/// How a token is rendered back into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    Piece,
    Byte(u8),
    Control,
}

#[derive(Clone)]
pub struct Tokenizer {
    model: Model,
    kind: VocabKind,
    pieces: Vec<String>,
    render: Vec<Render>,
    /// Special tokens longest first: (text, id, parsed even without `parse_special`).
    specials: Vec<(String, TokenId, bool)>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub add_bos: bool,
    chat: Option<ChatTemplate>,
    /// EOS and the chat template's end-of-turn token (looked up once: 262k pieces).
    stop: Vec<TokenId>,
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let pieces = f.strings("tokenizer.ggml.tokens")?;
        let types = f
            .i32s("tokenizer.ggml.token_type")
            .unwrap_or_else(|_| vec![TYPE_NORMAL; pieces.len()]);
        let model_name = f.string("tokenizer.ggml.model")?;
        let bos = f.u32("tokenizer.ggml.bos_token_id").ok();
        let eos = f.u32("tokenizer.ggml.eos_token_id").ok();
        let unk = f.u32("tokenizer.ggml.unknown_token_id").ok();
        let (model, kind) = match model_name.as_str() {
            "gpt2" => {
                let pre = f.string("tokenizer.ggml.pre").unwrap_or_default();
                let merges = f.strings("tokenizer.ggml.merges")?;
                (
                    Model::Bpe(Box::new(bpe::ByteLevelBpe::from_vocab(&pieces, &merges, &pre)?)),
                    VocabKind::ByteLevelBpe,
                )
            }
            "llama" => {
                let scores = f
                    .f32s("tokenizer.ggml.scores")
                    .unwrap_or_else(|_| vec![0.0; pieces.len()]);
                (Model::Spm(Box::new(spm::Spm::new(&pieces, scores, unk))), VocabKind::SentencePiece)
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "{}: tokenizer model `{other}` is not supported (gpt2 byte-level BPE and llama SentencePiece are)",
                    f.path.display()
                )))
            }
        };
        let add_bos = f.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let specials = types
            .iter()
            .enumerate()
            .filter_map(|(i, &t)| match t {
                TYPE_CONTROL | TYPE_UNKNOWN => Some((pieces[i].clone(), i as TokenId, false)),
                TYPE_USER_DEFINED => Some((pieces[i].clone(), i as TokenId, true)),
                _ => None,
            })
            .collect();
        let render = types
            .iter()
            .zip(&pieces)
            .map(|(&t, p)| match t {
                TYPE_CONTROL | TYPE_UNKNOWN => Render::Control,
                TYPE_BYTE => parse_byte_piece(p).map_or(Render::Piece, Render::Byte),
                _ => Render::Piece,
            })
            .collect();
        Ok(Self::assemble(
            model, kind, pieces, render, specials, bos, eos, add_bos,
        ))
    }

    /// Loads a Hugging Face `tokenizer.json` (byte-level BPE only).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let (model, pieces, added) = bpe::ByteLevelBpe::from_tokenizer_json(path)?;
        let mut render = vec![Render::Piece; pieces.len()];
        let mut specials = Vec::new();
        for (text, id, special) in added {
            if special {
                render[id as usize] = Render::Control;
            }
            specials.push((text, id, !special));
        }
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| pieces.iter().position(|p| p == n).map(|i| i as TokenId))
        };
        let bos = find(&["<|im_start|>", "<s>", "<|endoftext|>"]);
        let eos = find(&["<|im_end|>", "</s>", "<|endoftext|>"]);
        Ok(Self::assemble(
            Model::Bpe(Box::new(model)),
            VocabKind::ByteLevelBpe,
            pieces,
            render,
            specials,
            bos,
            eos,
            false,
        ))
    }

    /// Finds the tokenizer that belongs to a model path (GGUF file or HF directory).
    pub fn for_model(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_tokenizer_json(&path.join("tokenizer.json"))
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: Model,
        kind: VocabKind,
        pieces: Vec<String>,
        render: Vec<Render>,
        mut specials: Vec<(String, TokenId, bool)>,
        bos: Option<TokenId>,
        eos: Option<TokenId>,
        add_bos: bool,
    ) -> Self {
        specials.retain(|(s, _, _)| !s.is_empty());
        // stable sort keeps id order among equal lengths, as llama.cpp's does in practice
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let chat = ChatTemplate::detect(&pieces);
        let mut stop: Vec<TokenId> = eos.into_iter().collect();
        let end_of_turn = chat.and_then(|t| pieces.iter().position(|p| p == t.end_of_turn()));
        if let Some(id) = end_of_turn.map(|i| i as TokenId) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
        Self {
            model,
            kind,
            pieces,
            render,
            specials,
            bos,
            eos,
            add_bos,
            chat,
            stop,
        }
    }

    /// A Hugging Face tokenizer.json equivalent to this tokenizer (byte-level BPE only), with
    /// control tokens as special added tokens and user-defined ones as plain added tokens.
    pub fn to_tokenizer_json(&self) -> Result<String> {
        let Model::Bpe(m) = &self.model else {
            return Err(Error::Tokenizer(
                "only byte-level BPE vocabularies can be written as tokenizer.json here".into(),
            ));
        };
        let added: Vec<(String, bool)> = self
            .specials
            .iter()
            .map(|(s, _, always)| (s.clone(), !*always))
            .collect();
        m.to_json(&added)
    }

    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The vocabulary's raw piece for `id` (e.g. `Ġthe`, `▁the`, `<0x0A>`).
    pub fn piece(&self, id: TokenId) -> Option<&str> {
        self.pieces.get(id as usize).map(|s| s.as_str())
    }

    /// True for SentencePiece byte-fallback tokens (`<0xNN>`).
    pub fn is_byte_fallback(&self, id: TokenId) -> bool {
        matches!(self.render.get(id as usize), Some(Render::Byte(_)))
    }

    pub fn is_control(&self, id: TokenId) -> bool {
        self.render.get(id as usize) == Some(&Render::Control)
    }

    /// Encodes `text`, adding BOS when the model wants one; special-token text such as
    /// `<|im_start|>` becomes its token only when `parse_special` is true.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>> {
        let mut out = Vec::new();
        if self.add_bos {
            out.extend(self.bos);
        }
        self.encode_into(text, parse_special, &mut out)?;
        Ok(out)
    }

    /// Encodes without adding BOS.
    pub fn encode_into(
        &self,
        text: &str,
        parse_special: bool,
        out: &mut Vec<TokenId>,
    ) -> Result<()> {
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Special(id) => out.push(id),
                Fragment::Text(s) => match &self.model {
                    Model::Bpe(m) => m.encode(s, out)?,
                    Model::Spm(m) => m.encode(s, out),
                },
            }
        }
        Ok(())
    }

    /// Splits text on special tokens like llama.cpp: each special token, longest first, is cut
    /// out of every fragment that is still plain text.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for (s, id, always) in &self.specials {
            if !(*always || parse_special) || !text.contains(s.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(mut t) => {
                        while let Some(pos) = t.find(s.as_str()) {
                            if pos > 0 {
                                next.push(Fragment::Text(&t[..pos]));
                            }
                            next.push(Fragment::Special(*id));
                            t = &t[pos + s.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Fragment::Text(t));
                        }
                    }
                    sp => next.push(sp),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for; control tokens render as nothing unless `specials`.
    pub fn token_bytes(&self, id: TokenId, specials: bool) -> Vec<u8> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return Vec::new();
        };
        match self.render[id as usize] {
            Render::Control if !specials => Vec::new(),
            Render::Control => piece.as_bytes().to_vec(),
            Render::Byte(b) => vec![b],
            Render::Piece => match &self.model {
                Model::Bpe(m) => m.piece_bytes(piece),
                Model::Spm(_) => piece.replace('\u{2581}', " ").into_bytes(),
            },
        }
    }

    /// Decodes ids to text (invalid UTF-8 from partial byte tokens becomes U+FFFD).
    pub fn decode(&self, ids: &[TokenId], specials: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, specials))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders a conversation with the model's chat template, ready for the assistant's turn.
    pub fn apply_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self.chat.as_ref().ok_or_else(|| {
            Error::Tokenizer(
                "this vocabulary has no known chat template (ChatML or Gemma turns)".into(),
            )
        })?;
        Ok(t.render(messages))
    }

    /// Token ids that end a turn: EOS plus the template's end-of-turn token.
    pub fn stop_tokens(&self) -> Vec<TokenId> {
        self.stop.clone()
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Special(TokenId),
}

fn parse_byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}
