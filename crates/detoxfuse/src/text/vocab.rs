//! The common vocabulary of two tokenizers: tokens that stand for the same bytes.
//!
//! Pieces are compared by the bytes they decode to, which normalises both families: byte-level
//! BPE's `Ġ` (space), `Ċ` (newline) and byte alphabet, and SentencePiece's `▁` (space) and
//! `<0xNN>` byte-fallback tokens. Control/special tokens (BOS, EOS, chat markup, unused slots)
//! are excluded. Where one tokenizer has several ids for the same bytes (a SentencePiece
//! piece and its byte-fallback twin), the ordinary piece is kept.

use std::collections::HashMap;

use super::TokenId;
use super::Tokenizer;

/// Pairs of ids (first tokenizer, second tokenizer) whose tokens decode to the same bytes.
#[derive(Debug, Clone)]
pub struct CommonVocab {
    pub pairs: Vec<(TokenId, TokenId)>,
}

/// Canonical id per byte string: ordinary pieces win over byte-fallback tokens, then lower ids.
fn by_bytes(tok: &Tokenizer) -> HashMap<Vec<u8>, TokenId> {
    let mut map: HashMap<Vec<u8>, (bool, TokenId)> = HashMap::new();
    for id in 0..tok.vocab_size() as TokenId {
        if tok.is_control(id) {
            continue;
        }
        let bytes = tok.token_bytes(id, false);
        if bytes.is_empty() {
            continue;
        }
        let fallback = tok.is_byte_fallback(id);
        map.entry(bytes)
            .and_modify(|e| {
                if (fallback, id) < (e.0, e.1) {
                    *e = (fallback, id);
                }
            })
            .or_insert((fallback, id));
    }
    map.into_iter().map(|(k, (_, id))| (k, id)).collect()
}

impl CommonVocab {
    pub fn new(a: &Tokenizer, b: &Tokenizer) -> Self {
        let bmap = by_bytes(b);
        let mut pairs: Vec<(TokenId, TokenId)> = by_bytes(a)
            .into_iter()
            .filter_map(|(bytes, ia)| bmap.get(&bytes).map(|&ib| (ia, ib)))
            .collect();
        pairs.sort_unstable();
        Self { pairs }
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}
