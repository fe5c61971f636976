use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    for &(n, k) in &[
        (1536usize, 576usize),
        (1536, 768),
        (49152, 576),
        (49152, 768),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        for dt in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K] {
            if dt == GgmlDType::Q4K && k % 256 != 0 {
                continue;
            }
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, dt)?)?;
            for m in [1usize, 25] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
                let _ = q.forward(&x)?;
                let reps = if n > 10000 { 20 } else { 200 };
                let t = Instant::now();
                for _ in 0..reps {
                    let _ = q.forward(&x)?;
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{dt:?} n={n} k={k} m={m}: {:.3} ms, {:.1} GMAC/s",
                    s * 1e3,
                    (m * n * k) as f64 / s / 1e9
                );
            }
        }
    }
    Ok(())
}
