use std::time::Instant;
use candle_core::{Device, Tensor, DType};
fn main() -> anyhow::Result<()> {
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (49152, 576), &d)?;
    let wt = w.t()?.contiguous()?;
    for rows in [256usize, 1024, 4096] {
        let h = Tensor::randn(0f32, 1.0, (rows, 576), &d)?;
        let g = Tensor::randn(0f32, 1.0, (rows, 49152), &d)?;
        for _ in 0..2 {
            let t = Instant::now(); let _ = h.matmul(&w.t()?)?; let a = t.elapsed().as_secs_f64();
            let t = Instant::now(); let _ = h.matmul(&wt)?; let b = t.elapsed().as_secs_f64();
            let t = Instant::now(); let _ = g.matmul(&w)?; let c = t.elapsed().as_secs_f64();
            let t = Instant::now(); let _ = g.to_vec2::<f32>()?; let e = t.elapsed().as_secs_f64();
            let fl = 2.0 * rows as f64 * 576.0 * 49152.0 / 1e9;
            println!("rows {rows}: h·Wᵀ(view) {:.0} GF/s, h·Wᵀ(contig) {:.0} GF/s, g·W {:.0} GF/s, to_vec {e:.3}s", fl/a, fl/b, fl/c);
        }
    }
    let _ = DType::F32;
    Ok(())
}
