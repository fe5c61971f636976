//! Experiment: does a tuned-lens head make the truncated calibration model a language model,
//! and what does the probe say about it before any training?
//!
//! `cargo run --release --example lens_probe -- BASE.gguf CORPUS.jsonl TOXIGEN_DIR [TEXTS] [RIDGE]`

use std::path::PathBuf;

use detoxfuse::calibrate::model::Trainable;
use detoxfuse::calibrate::train::Base;
use detoxfuse::calibrate::{data, lens, probe};

fn main() -> detoxfuse::error::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base_path = PathBuf::from(&args[1]);
    let corpus = PathBuf::from(&args[2]);
    let toxigen = PathBuf::from(&args[3]);
    let texts: usize = args.get(4).map_or(200, |s| s.parse().unwrap());
    let ridge: f64 = args.get(5).map_or(1e-3, |s| s.parse().unwrap());
    let t0 = std::time::Instant::now();
    let base = Base::load(&base_path, 3)?;
    let tok = base.model.tokenizer.clone();
    let init = base.init(3, Trainable::default())?;
    let full = Base::load_full(&base_path)?;
    let (train, _val) = data::split(data::read_corpus(&corpus)?, 20);
    // Every k-th training record: a spread over sources.
    let sample = lens::sample(&train, texts);
    let ex = data::tokenize(&sample, &tok, 128)?;
    let pad = tok.eos.unwrap_or(0);
    let (x, y, n) = lens::hidden_pairs(&init, &full, &ex, 4096, pad)?;
    let d = init.config.hidden_size;
    eprintln!("{n} positions in {:.0} s", t0.elapsed().as_secs_f64());
    let w = lens::fit(&x, &y, n, d, ridge)?;
    let identity = candle_core::Tensor::eye(d, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    println!(
        "relative error: identity {:.4}, lens {:.4}",
        lens::relative_error(&x, &y, n, d, &identity)?,
        lens::relative_error(&x, &y, n, d, &w)?
    );
    let lensed = lens::apply(base.init(3, Trainable::default())?, &w)?;
    for kind in ["hate", "neutral"] {
        let items = probe::items(&toxigen, kind, 200)?;
        let a = probe::mean_nll(&init, &tok, &items)?.mean();
        let b = probe::mean_nll(&lensed, &tok, &items)?.mean();
        let c = probe::mean_nll(&full, &tok, &items)?.mean();
        println!(
            "{kind}: tied init {:.4}  lens init {:.4}  full base {:.4}",
            -a, -b, -c
        );
    }
    eprintln!("{:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
