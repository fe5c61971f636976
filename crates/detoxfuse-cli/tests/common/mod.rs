//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The built `detoxfuse` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_detoxfuse"))
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with a message containing `needle`, not a panic.
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}
