//! SentencePiece-style tokenizer driven by piece scores (Gemma's GGUF `tokenizer.ggml.model =
//! llama`): spaces become `▁`, the text is split into characters, and adjacent pairs whose
//! concatenation is a piece are merged highest score first (ties: leftmost first); characters
//! left over that are not pieces fall back to `<0xNN>` byte tokens. This mirrors llama.cpp's
//! `llm_tokenizer_spm`, the reference our fixtures come from.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::TokenId;

#[derive(Clone)]
pub struct Spm {
    piece_to_id: HashMap<String, TokenId>,
    scores: Vec<f32>,
    byte_tokens: [Option<TokenId>; 256],
    unk: Option<TokenId>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    pub fn new(pieces: &[String], scores: Vec<f32>, unk: Option<TokenId>) -> Self {
        let mut piece_to_id = HashMap::with_capacity(pieces.len());
        let mut byte_tokens = [None; 256];
        for (i, p) in pieces.iter().enumerate() {
            piece_to_id.insert(p.clone(), i as TokenId);
            if let Some(hex) = p.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
                if let (2, Ok(b)) = (hex.len(), u8::from_str_radix(hex, 16)) {
                    byte_tokens[b as usize] = Some(i as TokenId);
                }
            }
        }
        Self {
            piece_to_id,
            scores,
            byte_tokens,
            unk,
        }
    }

    /// Encodes text that contains no special tokens.
    pub fn encode(&self, text: &str, out: &mut Vec<TokenId>) {
        if text.is_empty() {
            return;
        }
        let text = text.replace(' ', "\u{2581}");
        let mut syms: Vec<Symbol> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: Option<usize>, r: Option<usize>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let s = &text[syms[l].start..syms[r].start + syms[r].len];
                if let Some(&id) = self.piece_to_id.get(s) {
                    heap.push(Bigram {
                        left: l,
                        right: r,
                        score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                        size: s.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue; // stale: one side was merged since this pair was queued
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            let prev = syms[l].prev;
            try_add(&mut heap, &syms, prev, Some(l));
            let next = syms[l].next;
            try_add(&mut heap, &syms, Some(l), next);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = &text[syms[k].start..syms[k].start + syms[k].len];
            match self.piece_to_id.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                            out.push(id);
                        }
                    }
                }
            }
            i = syms[k].next;
        }
    }
}
