//! Both real tokenizers (SmolLM2's byte-level BPE, Gemma-3's SentencePiece) on arbitrary
//! text, with and without special-token parsing, and arbitrary ids to decode.
//! Properties: no panic; `decode(encode(s)) == s` (both tokenizers are lossless on valid
//! UTF-8, except that SentencePiece writes a space as U+2581, so a literal U+2581 comes back
//! as a space).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tok = &common::tokenizers()[usize::from(mode & 1)];
    let specials = mode & 2 != 0;
    if mode & 4 != 0 {
        // arbitrary ids, some beyond the vocabulary
        let ids: Vec<u32> = rest
            .chunks(3)
            .map(|c| c.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)))
            .collect();
        let _ = tok.decode(&ids, specials);
        for &i in &ids {
            let _ = (tok.piece(i), tok.token_bytes(i, specials), tok.is_control(i));
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let ids = tok.encode(text, specials).expect("encoding valid UTF-8 never fails");
    assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    let back = tok.decode(&ids, specials);
    let want = if mode & 1 == 1 {
        text.replace('\u{2581}', " ")
    } else {
        text.to_string()
    };
    assert_eq!(back, want, "decode(encode(s)) != s");
});
