//! `detoxfuse bench`: speed of the engine, and of llama.cpp on the same file when installed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use detoxfuse::align::Variant;
use detoxfuse::bench::{threads as candle_threads, Decode, EngineSpeed, FusedSpeed};
use detoxfuse::calibrate::bench::TrainComparison;

#[derive(clap::Subcommand)]
pub enum BenchWhat {
    /// Calibration training speed (tokens/s, peak memory), and PyTorch's on the same
    /// architecture and batch when `torch` is importable.
    Train(TrainBenchArgs),
    /// Fused (target + calibration model) versus plain decoding throughput, per target.
    Fused(FusedBenchArgs),
    /// Load test of `detoxfuse serve`: many requests at a fixed concurrency; throughput,
    /// latency percentiles, status counts. Starts its own server unless --url is given.
    Serve(crate::serve::load::LoadArgs),
}

#[derive(clap::Args)]
pub struct FusedBenchArgs {
    /// Calibration: "default" (the shipped fusion-aware calibration, no training), "fused" (the one
    /// `calibrate --recipe fused` trains here, on first use), "paper" (the paper recipe's model,
    /// trained on first use), or a directory.
    #[arg(long, default_value = "default")]
    calibration: String,
    /// Targets: fetched names or .gguf paths.
    #[arg(long, num_args = 1.., default_values = ["smollm2", "gemma3"])]
    targets: Vec<String>,
    #[arg(long, default_value_t = 0.2)]
    alpha: f64,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[command(flatten)]
    decode: Decode,
}

pub fn fused(cache: &Path, a: FusedBenchArgs) -> Result<()> {
    println!(
        "{}, alpha {}, plain and fused alternating, medians of {} runs",
        a.decode.describe(a.prompt_tokens),
        a.alpha,
        a.decode.runs
    );
    println!("{}", FusedSpeed::HEADER);
    for name in &a.targets {
        let path = crate::resolve(cache, name)?;
        let model = detoxfuse::lm::load(&path)?;
        let tok = detoxfuse::text::Tokenizer::for_model(&path)?;
        let f = crate::align::load_fusion(
            cache,
            &a.calibration,
            None,
            &path,
            model.as_ref(),
            a.alpha,
            Variant::Hidden,
        )?;
        println!(
            "{}",
            FusedSpeed::measure(
                name,
                model.as_ref(),
                &tok,
                &f,
                a.alpha,
                a.prompt_tokens,
                &a.decode
            )?
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// Base model (its first --layers layers are trained).
    #[arg(long, default_value = "smollm2")]
    base: String,
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    rows: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    len: usize,
    /// Measured steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Python with torch and transformers (default: .venv-torch/bin/python if present, else
    /// python3 if it can import torch).
    #[arg(long)]
    torch_python: Option<PathBuf>,
}

pub fn train(cache: &Path, a: TrainBenchArgs) -> Result<()> {
    let path = crate::resolve(cache, &a.base)?;
    println!(
        "calibration training, {} layers of {}, batch {} x {} tokens, frozen embeddings/head, threads {}",
        a.layers,
        path.display(),
        a.rows,
        a.len,
        candle_threads()
    );
    let shape = (a.rows, a.len, a.steps);
    println!(
        "{}",
        TrainComparison::measure(&path, a.layers, shape, a.torch_python)?
    );
    Ok(())
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// Models to measure: fetched names or .gguf paths.
    #[arg(long, short, num_args = 1.., default_values = ["smollm2", "gemma3"])]
    models: Vec<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[command(flatten)]
    decode: Decode,
    /// Python with llama-cpp-python for the comparison (default: .venv-ref/bin/python if present).
    #[arg(long)]
    llama_cpp_python: Option<PathBuf>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cache: &Path, a: BenchArgs) -> Result<()> {
    match a.what {
        Some(BenchWhat::Train(t)) => return train(cache, t),
        Some(BenchWhat::Fused(f)) => return fused(cache, f),
        Some(BenchWhat::Serve(l)) => return crate::serve::load::run(cache, l),
        None => {}
    }
    let threads = candle_threads();
    let py = a
        .llama_cpp_python
        .clone()
        .or_else(|| Some(PathBuf::from(".venv-ref/bin/python")).filter(|p| p.exists()));
    let line = a.decode.describe(a.prompt_tokens);
    println!("{line}, medians of {} runs", a.decode.runs);
    println!("{}", EngineSpeed::HEADER);
    let mut all = Vec::new();
    for name in &a.models {
        let path = crate::resolve(cache, name)?;
        let (row, failed) =
            EngineSpeed::measure(name, &path, a.prompt_tokens, &a.decode, py.as_deref())?;
        if let Some(e) = failed {
            eprintln!("llama.cpp comparison skipped for {name}: {e}");
        }
        println!("{row}");
        all.push(serde_json::json!({"model": name, "path": path, "threads": threads, "speed": row.speed,
            "llama_cpp": row.llama_cpp.map(|r| serde_json::json!({"prompt_tps": r.0, "decode_tps": r.1}))}));
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
