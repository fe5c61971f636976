//! Byte-level BPE (GPT-2 family: SmolLM2), built from GGUF vocab + merges or loaded from a
//! tokenizer.json, run by the `tokenizers` crate without its added-token handling (special
//! tokens are partitioned by [`super::Tokenizer`] so both tokenizer kinds share that logic).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

use super::TokenId;
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct ByteLevelBpe {
    inner: tokenizers::Tokenizer,
    char_to_byte: HashMap<char, u8>,
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// GPT-2's reversible map from bytes to printable characters (`Ġ` = space, `Ċ` = newline).
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    table
}

impl ByteLevelBpe {
    /// `pre` is GGUF's `tokenizer.ggml.pre`. `smollm` (like `starcoder`, `refact`) splits every
    /// digit on its own before the GPT-2 pattern; the GPT-2 pattern itself adds no prefix
    /// space (candle's `from_gguf` gets this wrong).
    pub fn from_vocab(pieces: &[String], merges: &[String], pre: &str) -> Result<Self> {
        let vocab: Vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("merge `{m}` is not two pieces")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tk_err)?;
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true));
        let split_digits = matches!(pre, "smollm" | "starcoder" | "refact" | "command-r");
        let pre_tok = if split_digits {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ]))
        } else {
            byte_level
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tok));
        Ok(Self::wrap(inner))
    }

    /// Loads tokenizer.json; returns the model, its pieces by id and its added tokens
    /// (text, id, is_special).
    #[allow(clippy::type_complexity)]
    pub fn from_tokenizer_json(
        path: &Path,
    ) -> Result<(Self, Vec<String>, Vec<(String, TokenId, bool)>)> {
        let full = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let vocab = full.get_vocab(true);
        let mut pieces =
            vec![String::new(); vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
        for (p, i) in vocab {
            pieces[i as usize] = p;
        }
        let added = full
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id, t.special))
            .collect();
        let mut inner = tokenizers::Tokenizer::new(full.get_model().clone());
        inner.with_normalizer(full.get_normalizer().cloned());
        inner.with_pre_tokenizer(full.get_pre_tokenizer().cloned());
        Ok((Self::wrap(inner), pieces, added))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let char_to_byte = byte_to_char()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Self {
            inner,
            char_to_byte,
        }
    }

    /// Serialises as tokenizer.json with the given added tokens (text, special) and a
    /// byte-level decoder.
    pub fn to_json(&self, added: &[(String, bool)]) -> Result<String> {
        let mut t = self.inner.clone();
        t.with_decoder(Some(ByteLevel::default()));
        let tokens: Vec<tokenizers::AddedToken> = added
            .iter()
            .map(|(s, special)| tokenizers::AddedToken::from(s.clone(), *special))
            .collect();
        t.add_tokens(&tokens);
        t.to_string(true).map_err(tk_err)
    }

    pub fn encode(&self, text: &str, out: &mut Vec<TokenId>) -> Result<()> {
        let enc = self.inner.encode_fast(text, false).map_err(tk_err)?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Bytes of a byte-level piece (`Ġhello` → b" hello").
    pub fn piece_bytes(&self, piece: &str) -> Vec<u8> {
        piece
            .chars()
            .map(|c| match self.char_to_byte.get(&c) {
                Some(&b) => vec![b],
                None => c.to_string().into_bytes(),
            })
            .collect::<Vec<_>>()
            .concat()
    }
}
