//! One line of a JSONL input file, as generate/eval read a prompt and score reads texts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((_, prompt)) = detoxfuse::eval::harness::parse_prompt_line(line) {
        // the prompt is a string that was in the line (escapes decoded)
        assert!(prompt.len() <= line.len());
    }
    let _ = detoxfuse::score::line_texts(line, "text");
});
