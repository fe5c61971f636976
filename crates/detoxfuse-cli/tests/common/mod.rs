//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

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

/// Spawns `detoxfuse serve` as `cmd` describes (with `--port 0`) and returns the child and
/// the port it printed on its first line.
pub fn spawn_server(cmd: &mut Command) -> (Child, u16) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, port)
}
