//! `detoxfuse bench`: speed of the engine, and of llama.cpp on the same file when installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use detoxfuse::bench::{measure, synthetic_prompt};
use detoxfuse::generate::PlainDecoder;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Models to measure: fetched names or .gguf paths.
    #[arg(long, short, num_args = 1.., default_values = ["smollm2", "gemma3"])]
    models: Vec<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Samples decoded together in the batched measurement.
    #[arg(long, default_value_t = 25)]
    batch: usize,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python with llama-cpp-python for the comparison (default: .venv-ref/bin/python if present).
    #[arg(long)]
    llama_cpp_python: Option<PathBuf>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cache: &Path, a: BenchArgs) -> Result<()> {
    let threads = candle_threads();
    let py = a
        .llama_cpp_python
        .clone()
        .or_else(|| Some(PathBuf::from(".venv-ref/bin/python")).filter(|p| p.exists()));
    println!(
        "threads {threads}, prompt {} tokens, decode {} tokens, batch {}, medians of {} runs",
        a.prompt_tokens, a.decode_tokens, a.batch, a.runs
    );
    println!(
        "{:<10} {:>12} {:>12} {:>14} {:>9} | {:>12} {:>12} {:>8} {:>8}",
        "model",
        "prompt t/s",
        "decode t/s",
        "batched t/s",
        "batch÷1",
        "llama.cpp pp",
        "llama.cpp tg",
        "pp ratio",
        "tg ratio"
    );
    let mut all = Vec::new();
    for name in &a.models {
        let path = crate::ModelArg {
            model: name.clone(),
        }
        .resolve(cache)?;
        let model = detoxfuse::lm::load(&path)?;
        let tok = detoxfuse::text::Tokenizer::for_model(&path)?;
        let prompt = synthetic_prompt(
            a.prompt_tokens,
            tok.vocab_size(),
            tok.bos.filter(|_| tok.add_bos),
        );
        let mut dec = PlainDecoder::new(model.as_ref());
        let s = measure(&mut dec, &prompt, a.decode_tokens, a.batch, a.runs)?;
        let reference = match &py {
            Some(py) => match llama_cpp(py, &path, threads, a.decode_tokens, a.runs, &prompt) {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("llama.cpp comparison skipped for {name}: {e:#}");
                    None
                }
            },
            None => None,
        };
        let (rpp, rtg) = reference
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |r| (r.0, r.1));
        println!(
            "{:<10} {:>12.1} {:>12.1} {:>14.1} {:>8.2}x | {:>12.1} {:>12.1} {:>7.2}x {:>7.2}x",
            name,
            s.prompt_tps,
            s.decode_tps,
            s.batched_tps,
            s.batched_tps / s.decode_tps,
            rpp,
            rtg,
            s.prompt_tps / rpp,
            s.decode_tps / rtg
        );
        all.push(serde_json::json!({"model": name, "path": path, "threads": threads, "speed": s,
            "llama_cpp": reference.map(|r| serde_json::json!({"prompt_tps": r.0, "decode_tps": r.1}))}));
    }
    if py.is_none() {
        println!("llama.cpp not measured: run scripts/setup_reference_env.sh (builds llama-cpp-python, ~11 min) or pass --llama-cpp-python");
    }
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Threads candle uses (RAYON_NUM_THREADS, else all cores).
fn candle_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn llama_cpp(
    py: &Path,
    model: &Path,
    threads: usize,
    decode: usize,
    runs: usize,
    prompt: &[u32],
) -> Result<(f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_llama_cpp.py");
    let out = Command::new(py)
        .arg(script)
        .arg(model)
        .arg(threads.to_string())
        .arg(decode.to_string())
        .arg(runs.to_string())
        .arg(serde_json::to_string(prompt)?)
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "llama.cpp bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))
        .with_context(|| format!("llama.cpp bench printed {line:?}"))?;
    Ok((
        v["prompt_tps"].as_f64().unwrap_or(f64::NAN),
        v["decode_tps"].as_f64().unwrap_or(f64::NAN),
    ))
}
