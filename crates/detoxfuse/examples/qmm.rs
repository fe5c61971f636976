//! Micro-benchmark of quantized matmuls on this CPU: candle's QMatMul (Q4_1, Q8_0, Q8_0 with
//! the input width padded to 256 for its repacked kernel) and detoxfuse's tiled VNNI Q8_0
//! kernel. `cargo run --release -p detoxfuse --example qmm` (`-- --tiles` times only the
//! tiles, per kernel this CPU has, at batch sizes 1, 25 and 256).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use detoxfuse::lm::q8::Q8Tiles;
use std::time::Instant;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// SmolLM2's projection shapes `(out, in)`: MLP up/gate, MLP down, the head.
const SHAPES: [(usize, usize); 3] = [(1536, 576), (576, 1536), (49152, 576)];

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--tiles") {
        return tiles_only();
    }
    for (n, k) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let ours = Q8Tiles::pack(&q8)?.expect("tileable shape");
        let kp = k.next_multiple_of(256);
        let padded = QMatMul::from_qtensor(QTensor::quantize(
            &w.pad_with_zeros(1, 0, kp - k)?,
            GgmlDType::Q8_0,
        )?)?;
        let candle = QMatMul::from_qtensor(q8)?;
        let q41 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1)?)?;
        for m in [1usize, 25] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let xp = x.pad_with_zeros(1, 0, kp - k)?;
            let reps = if n > 10000 { 10 } else { 100 };
            let macs = (m * n * k) as f64 / 1e9;
            let rows = [
                ("candle Q4_1", time(reps, || drop(q41.forward(&x).unwrap()))),
                (
                    "candle Q8_0",
                    time(reps, || drop(candle.forward(&x).unwrap())),
                ),
                (
                    "candle Q8_0 padded",
                    time(reps, || drop(padded.forward(&xp).unwrap())),
                ),
                (
                    "detoxfuse Q8_0 tiles",
                    time(reps, || drop(ours.forward(&x).unwrap())),
                ),
            ];
            for (name, s) in rows {
                println!(
                    "{n:>6}x{k:<5} m={m:<3} {name:<21} {:>8.3} ms {:>6.1} GMAC/s",
                    s * 1e3,
                    macs / s
                );
            }
        }
    }
    Ok(())
}

fn tiles_only() -> anyhow::Result<()> {
    use detoxfuse::lm::q8::{supports, KERNELS};
    for (n, k) in SHAPES {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let ours = Q8Tiles::pack(&QTensor::quantize(&w, GgmlDType::Q8_0)?)?.expect("tileable");
        for kernel in KERNELS {
            if !supports(kernel) {
                continue;
            }
            for m in [1usize, 25, 256] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
                    .collect();
                let macs = (m * n * k) as f64 / 1e9;
                let reps = ((2.0 / macs) as usize).clamp(3, 200);
                let s = time(reps, || drop(ours.matmul_with(kernel, m, &x)));
                println!(
                    "{n:>6}x{k:<5} m={m:<4} {kernel:<12?} {:>8.3} ms {:>6.1} GMAC/s",
                    s * 1e3,
                    macs / s
                );
            }
        }
    }
    Ok(())
}
