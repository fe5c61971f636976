//! The cross-tokenizer step of the fused decoder: the calibration tokenizer re-reads a byte
//! stream that grows by arbitrary chunks (UTF-8 characters split anywhere) and says how many
//! of its previous ids still stand. Properties: no panic; the kept ids are a prefix of both
//! readings; something new follows them; and after the last chunk the ids equal a one-shot
//! encoding of the stream's complete-UTF-8 prefix (the KV cache rollback is exact).
#![no_main]

#[path = "common.rs"]
mod common;

use detoxfuse::fuse::CrossText;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let tok = &common::tokenizers()[usize::from(mode & 1)];
    let mut x = CrossText::default();
    // chunks: a length byte (0..=15), then that many bytes
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n & 15).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        let before = x.ids().to_vec();
        if let Some(keep) = x.push(tok, chunk).expect("encoding valid UTF-8 never fails") {
            assert!(keep <= before.len() && keep < x.ids().len());
            assert_eq!(before[..keep], x.ids()[..keep]);
        } else {
            assert_eq!(before, x.ids());
        }
    }
    let valid = match std::str::from_utf8(x.bytes()) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&x.bytes()[..e.valid_up_to()]).unwrap(),
    };
    assert_eq!(x.ids(), tok.encode(valid, false).unwrap());
});
