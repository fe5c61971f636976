//! Q8_0 × Q8_0 matrix multiply for x86 CPUs with AVX-512 VNNI or AVX2.
//!
//! candle 0.11 multiplies Q8_0 weights with an AVX2 dot product per (row, column) pair, which
//! gains little from batching (21-27 GMAC/s here at 1 or 25 rows); its repacked VNNI kernel is
//! 3-4× faster but only applies when the input width is a multiple of 256 and then rounds
//! activations per 256 values, doubling the logit error (docs/ENGINE.md). This kernel keeps
//! llama.cpp's numerics, activations rounded per 32 values like the weights, and borrows the
//! repacked layout: 16 output columns are interleaved so that one `vpdpbusd` multiplies 4
//! activation bytes, broadcast, with 4 bytes of each of 16 columns, accumulating in integers
//! over a whole 32-block before one float scale per block. Each loaded weight block serves
//! every activation row of the batch.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: activations are stored as `q + 128` and the
//! excess `128 · Σw` of each block is precomputed per column and subtracted.
//!
//! CPUs without AVX-512 VNNI (AVX2 only: AMD Zen 2/3, most Intel client parts) get the same
//! tile layout through `vpmaddubsw`: `|w| · sign(q, w)` per byte pair (at most 2 · 128 · 127,
//! so the 16-bit sums cannot saturate), widened by `vpmaddwd`. Both kernels compute the exact
//! integer `Σ q·w` of every block and then the same float operations, so their outputs are
//! equal bit for bit. On such a CPU candle multiplies Q8_0 one (row, column) dot product at a
//! time and streams the whole weight matrix once per activation row, so batching gains nothing
//! (measured: k = 25 at 1.06× batch 1); the tiles read each weight block once for all rows.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const QK: usize = 32;
/// Output columns per tile (one 512-bit register of i32/f32 lanes).
const TILE: usize = 16;
/// Bytes of one packed tile block: 32 values × 16 columns.
const TILE_BLOCK: usize = QK * TILE;
/// Activation rows per pass over a tile.
const ROWS: usize = 4;

#[derive(Debug)]
pub struct Q8Tiles {
    n: usize,
    k: usize,
    /// `[tile][block][group of 4 values][column][4]` bytes.
    quants: Vec<i8>,
    /// `[tile][block][column]` weight scales.
    scales: Vec<f32>,
    /// `[tile][block][column]`: `128 · Σ w` over the block.
    excess: Vec<i32>,
}

/// Which instruction set runs the tiles on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit `vpdpbusd`, 16 columns a register.
    Avx512Vnni,
    /// 256-bit `vpmaddubsw` + `vpmaddwd`, two registers of 8 columns.
    Avx2,
}

/// Every kernel, fastest first.
pub const KERNELS: [Kernel; 2] = [Kernel::Avx512Vnni, Kernel::Avx2];

/// The fastest kernel this CPU can run, if any (detected once).
pub fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| KERNELS.into_iter().find(|&k| supports(k)))
}

/// Whether this CPU has the instructions of `k` (an AVX-512 VNNI CPU also runs the AVX2 one).
pub fn supports(k: Kernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match k {
            Kernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
            }
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// Whether this CPU can run the tiles at all.
pub fn available() -> bool {
    kernel().is_some()
}

/// Whether a Q8_0 matrix of input width `k` should use the tiles rather than candle. Candle
/// 0.11 has fast repacked kernels of its own for widths that are a multiple of 256, on CPUs
/// with AVX-512 VNNI or AVX-VNNI (which round activations per 256 values); without VNNI it
/// has only its per-dot-product path, slower than the tiles at every batch size.
pub fn takes(k: usize) -> bool {
    /// Input widths that candle's repacked x86 kernels handle themselves.
    const REPACK_K: usize = 256;
    match kernel() {
        None => false,
        Some(Kernel::Avx512Vnni) => !k.is_multiple_of(REPACK_K),
        Some(Kernel::Avx2) => {
            #[cfg(target_arch = "x86_64")]
            {
                !k.is_multiple_of(REPACK_K) || !is_x86_feature_detected!("avxvnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        }
    }
}

impl Q8Tiles {
    /// Packs a Q8_0 `(n, k)` weight; `None` when the shape does not tile.
    pub fn pack(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0 {
            return Ok(None);
        }
        let (n, k) = t.shape().dims2()?;
        if n % TILE != 0 || k % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let nb = k / QK;
        if data.len() != n * nb * 34 {
            return Err(Error::Input(format!(
                "Q8_0 tensor holds {} bytes, expected {}",
                data.len(),
                n * nb * 34
            )));
        }
        let mut quants = vec![0i8; n * k];
        let mut scales = vec![0f32; n * nb];
        let mut excess = vec![0i32; n * nb];
        for col in 0..n {
            let (tile, c) = (col / TILE, col % TILE);
            for b in 0..nb {
                let blk = &data[(col * nb + b) * 34..(col * nb + b + 1) * 34];
                let at = (tile * nb + b) * TILE + c;
                scales[at] = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let qs = &blk[2..];
                excess[at] = 128 * qs.iter().map(|&q| q as i8 as i32).sum::<i32>();
                let base = (tile * nb + b) * TILE_BLOCK;
                for g in 0..QK / 4 {
                    for j in 0..4 {
                        quants[base + g * TILE * 4 + c * 4 + j] = qs[g * 4 + j] as i8;
                    }
                }
            }
        }
        Ok(Some(Self {
            n,
            k,
            quants,
            scales,
            excess,
        }))
    }

    /// `x`: `(.., k)` f32 → `(.., n)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            return Err(Error::Input(format!(
                "input width {k}, weights expect {}",
                self.k
            )));
        }
        let m = x.elem_count() / k.max(1);
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let out = self.matmul(m, &xs);
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 1") = self.n;
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }

    /// Like [`Self::forward`] for a matrix that stacks several projections' rows: returns one
    /// tensor per part, `sizes` giving each part's output width.
    pub fn forward_split(&self, x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k || sizes.iter().sum::<usize>() != self.n {
            return Err(Error::Input(format!(
                "fused projection: input width {k}, parts {sizes:?} vs {}×{}",
                self.n, self.k
            )));
        }
        let m = x.elem_count() / k.max(1);
        let out = self.matmul(m, &x.flatten_all()?.to_vec1()?);
        let mut start = 0;
        sizes
            .iter()
            .map(|&w| {
                let mut part = Vec::with_capacity(m * w);
                for r in 0..m {
                    part.extend_from_slice(&out[r * self.n + start..r * self.n + start + w]);
                }
                start += w;
                let mut shape = dims.clone();
                *shape.last_mut().expect("rank >= 1") = w;
                Ok(Tensor::from_vec(part, shape, &Device::Cpu)?)
            })
            .collect()
    }

    /// `x`: `m × k` row-major → `m × n` row-major, with this CPU's best kernel.
    pub fn matmul(&self, m: usize, x: &[f32]) -> Vec<f32> {
        let kernel = kernel().expect("Q8Tiles is only used where a kernel is available");
        self.matmul_with(kernel, m, x)
    }

    /// [`Self::matmul`] with a chosen kernel (to compare them); panics when the CPU lacks its
    /// instructions ([`supports`]).
    pub fn matmul_with(&self, kernel: Kernel, m: usize, x: &[f32]) -> Vec<f32> {
        assert!(
            supports(kernel),
            "this CPU cannot run the {kernel:?} kernel"
        );
        let nb = self.k / QK;
        let (aq, ad) = quantize_rows_u8(x);
        let tiles = self.n / TILE;
        // Tiles are spread over candle's own worker pool: a second pool (rayon) would compete
        // with candle's spinning workers for the same cores.
        let mut out = vec![0f32; m * self.n];
        let out_addr = out.as_mut_ptr() as usize;
        let n = self.n;
        candle_core::utils::barrier_pool().execute_chunked(tiles, |range| {
            for t in range {
                let w = &self.quants[t * nb * TILE_BLOCK..(t + 1) * nb * TILE_BLOCK];
                let s = &self.scales[t * nb * TILE..(t + 1) * nb * TILE];
                let e = &self.excess[t * nb * TILE..(t + 1) * nb * TILE];
                for r0 in (0..m).step_by(ROWS) {
                    let rows = ROWS.min(m - r0);
                    let a = &aq[r0 * self.k..];
                    let d = &ad[r0 * nb..];
                    // SAFETY: tile `t` writes only columns [16t, 16t+16) of each row of `out`,
                    // disjoint from every other tile; `out` outlives this call; the CPU has
                    // `kernel`'s instructions (asserted above).
                    unsafe {
                        let o = (out_addr as *mut f32).add(r0 * n + t * TILE);
                        match (kernel, rows) {
                            (Kernel::Avx512Vnni, 4) => tile_rows::<4>(w, s, e, a, d, nb, o, n),
                            (Kernel::Avx512Vnni, 3) => tile_rows::<3>(w, s, e, a, d, nb, o, n),
                            (Kernel::Avx512Vnni, 2) => tile_rows::<2>(w, s, e, a, d, nb, o, n),
                            (Kernel::Avx512Vnni, _) => tile_rows::<1>(w, s, e, a, d, nb, o, n),
                            (Kernel::Avx2, 4) => tile_rows_avx2::<4>(w, s, a, d, nb, o, n),
                            (Kernel::Avx2, 3) => tile_rows_avx2::<3>(w, s, a, d, nb, o, n),
                            (Kernel::Avx2, 2) => tile_rows_avx2::<2>(w, s, a, d, nb, o, n),
                            (Kernel::Avx2, _) => tile_rows_avx2::<1>(w, s, a, d, nb, o, n),
                        }
                    }
                }
            }
        });
        out
    }
}

/// llama.cpp's `quantize_row_q8_0` with f32 scales (`d = max|x| / 127`, `q = round(x / d)`),
/// stored as `q + 128` for the unsigned operand of `vpdpbusd`. Blocks are independent, so
/// larger inputs (a batch's rows) are split over the worker pool: the same values, in a
/// fraction of the time a serial pass takes between two parallel matmuls.
fn quantize_rows_u8(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    /// Blocks below which one thread quantizes (a batch-1 row is 18-48 blocks).
    const PARALLEL_BLOCKS: usize = 256;
    let blocks = x.len() / QK;
    let mut q = vec![0u8; blocks * QK];
    let mut d = vec![0f32; blocks];
    if blocks < PARALLEL_BLOCKS {
        quantize_blocks(x, &mut q, &mut d);
        return (q, d);
    }
    let (q_addr, d_addr) = (q.as_mut_ptr() as usize, d.as_mut_ptr() as usize);
    candle_core::utils::barrier_pool().execute_chunked(blocks, |range| {
        // SAFETY: each range of blocks writes only its own bytes of `q` and entries of `d`;
        // both outlive this call.
        let (qs, ds) = unsafe {
            (
                std::slice::from_raw_parts_mut(
                    (q_addr as *mut u8).add(range.start * QK),
                    range.len() * QK,
                ),
                std::slice::from_raw_parts_mut((d_addr as *mut f32).add(range.start), range.len()),
            )
        };
        quantize_blocks(&x[range.start * QK..range.end * QK], qs, ds);
    });
    (q, d)
}

fn quantize_blocks(x: &[f32], q: &mut [u8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(d) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = amax / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(xb) {
            *o = ((v * inv).round() as i32 + 128) as u8;
        }
        *db = s;
    }
}

/// One tile (16 columns) against `R` activation rows; writes 16 results per row at `out`,
/// rows `stride` floats apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const R: usize>(
    w: &[i8],
    s: &[f32],
    e: &[i32],
    a: &[u8],
    d: &[f32],
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    let k = nb * QK;
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        // two accumulators per row (even / odd groups) halve the dependency chain of
        // `vpdpbusd`, which is what bounds a single row
        let mut dot = [_mm512_setzero_si512(); R];
        let mut dot2 = [_mm512_setzero_si512(); R];
        let wb = w.as_ptr().add(b * TILE_BLOCK);
        for g in (0..QK / 4).step_by(2) {
            let wv = _mm512_loadu_si512(wb.add(g * TILE * 4) as *const _);
            let wv2 = _mm512_loadu_si512(wb.add((g + 1) * TILE * 4) as *const _);
            for r in 0..R {
                let ap = a.as_ptr().add(r * k + b * QK + g * 4);
                let a4 = std::ptr::read_unaligned(ap as *const i32);
                let a4b = std::ptr::read_unaligned(ap.add(4) as *const i32);
                dot[r] = _mm512_dpbusd_epi32(dot[r], _mm512_set1_epi32(a4), wv);
                dot2[r] = _mm512_dpbusd_epi32(dot2[r], _mm512_set1_epi32(a4b), wv2);
            }
        }
        for r in 0..R {
            dot[r] = _mm512_add_epi32(dot[r], dot2[r]);
        }
        let ws = _mm512_loadu_ps(s.as_ptr().add(b * TILE));
        let ex = _mm512_loadu_si512(e.as_ptr().add(b * TILE) as *const _);
        for r in 0..R {
            let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*d.get_unchecked(r * nb + b)));
            let exact = _mm512_sub_epi32(dot[r], ex);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, acc[r]);
        }
    }
    for (r, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * stride), *v);
    }
}

/// [`tile_rows`] for AVX2: the same tile, as two halves of 8 columns. Activations are
/// stored as `q + 128`; flipping the top bit gives `q` back as a signed byte, so no excess
/// correction is needed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_avx2<const R: usize>(
    w: &[i8],
    s: &[f32],
    a: &[u8],
    d: &[f32],
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    let k = nb * QK;
    let flip = _mm256_set1_epi8(i8::MIN);
    let ones = _mm256_set1_epi16(1);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let mut dlo = [_mm256_setzero_si256(); R];
        let mut dhi = [_mm256_setzero_si256(); R];
        let wb = w.as_ptr().add(b * TILE_BLOCK);
        for g in 0..QK / 4 {
            let wlo = _mm256_loadu_si256(wb.add(g * TILE * 4) as *const __m256i);
            let whi = _mm256_loadu_si256(wb.add(g * TILE * 4 + 32) as *const __m256i);
            // |w| read as unsigned: −128 becomes 128
            let (ulo, uhi) = (_mm256_abs_epi8(wlo), _mm256_abs_epi8(whi));
            for r in 0..R {
                let a4 =
                    std::ptr::read_unaligned(a.as_ptr().add(r * k + b * QK + g * 4) as *const i32);
                let q = _mm256_xor_si256(_mm256_set1_epi32(a4), flip);
                let plo = _mm256_maddubs_epi16(ulo, _mm256_sign_epi8(q, wlo));
                let phi = _mm256_maddubs_epi16(uhi, _mm256_sign_epi8(q, whi));
                dlo[r] = _mm256_add_epi32(dlo[r], _mm256_madd_epi16(plo, ones));
                dhi[r] = _mm256_add_epi32(dhi[r], _mm256_madd_epi16(phi, ones));
            }
        }
        let slo = _mm256_loadu_ps(s.as_ptr().add(b * TILE));
        let shi = _mm256_loadu_ps(s.as_ptr().add(b * TILE + 8));
        for r in 0..R {
            let da = _mm256_set1_ps(*d.get_unchecked(r * nb + b));
            lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dlo[r]), _mm256_mul_ps(slo, da), lo[r]);
            hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dhi[r]), _mm256_mul_ps(shi, da), hi[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out.add(r * stride), lo[r]);
        _mm256_storeu_ps(out.add(r * stride + 8), hi[r]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const R: usize>(
    _: &[i8],
    _: &[f32],
    _: &[i32],
    _: &[u8],
    _: &[f32],
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("Q8Tiles is only used where kernel() is Some")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_avx2<const R: usize>(
    _: &[i8],
    _: &[f32],
    _: &[u8],
    _: &[f32],
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("Q8Tiles is only used where kernel() is Some")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool-split quantization equals one serial pass, value for value.
    #[test]
    fn parallel_activation_quantization_equals_serial() {
        let x: Vec<f32> = (0..25 * 576)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let (q, d) = quantize_rows_u8(&x);
        let (mut q1, mut d1) = (vec![0u8; x.len()], vec![0f32; x.len() / QK]);
        quantize_blocks(&x, &mut q1, &mut d1);
        assert_eq!(q, q1);
        assert_eq!(d, d1);
    }

    /// The kernels this CPU can run.
    fn runnable() -> Vec<Kernel> {
        KERNELS.into_iter().filter(|&k| supports(k)).collect()
    }

    /// Σ over blocks of (Σ q_w · q_a) · d_w · d_a in f64: the exact value both kernels round.
    fn scalar(q: &QTensor, x: &[f32], m: usize) -> Vec<f64> {
        let (n, k) = q.shape().dims2().unwrap();
        let nb = k / QK;
        let data = q.data().unwrap();
        let (aq, ad) = quantize_rows_u8(x);
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut acc = 0f64;
                for b in 0..nb {
                    let blk = &data[(c * nb + b) * 34..(c * nb + b + 1) * 34];
                    let dw = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32() as f64;
                    let dot: i64 = (0..QK)
                        .map(|i| (blk[2 + i] as i8 as i64) * (aq[r * k + b * QK + i] as i64 - 128))
                        .sum();
                    acc += dot as f64 * dw * ad[r * nb + b] as f64;
                }
                out[r * n + c] = acc;
            }
        }
        out
    }

    /// `got` is within rounding of the exact `want`.
    fn assert_close(kern: Kernel, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() < 1e-4 * w.abs().max(1.0),
                "{kern:?} at {i}: {g} vs {w}"
            );
        }
    }

    /// Shapes and numerics only (random weights): every kernel this CPU has equals a scalar
    /// evaluation of the same quantized weights and activations, and the kernels equal each
    /// other bit for bit (the integer sums are exact, the float steps the same). A CPU with
    /// neither kernel must leave every matrix to candle.
    #[test]
    fn tiled_kernels_equal_scalar_q8_dot_products_and_each_other() {
        let kernels = runnable();
        if kernels.is_empty() {
            assert!(!available() && !takes(576) && !takes(1536));
            return;
        }
        let (n, k) = (48, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let tiles = Q8Tiles::pack(&q).unwrap().unwrap();
        for m in [1usize, 3, 4, 7, 90] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
                .collect();
            let want = scalar(&q, &x, m);
            let first = tiles.matmul_with(kernels[0], m, &x);
            for &kern in &kernels {
                let got = tiles.matmul_with(kern, m, &x);
                assert_eq!(
                    got, first,
                    "{kern:?} differs from {:?} at m={m}",
                    kernels[0]
                );
                assert_close(kern, &got, &want);
            }
            assert_eq!(tiles.matmul(m, &x), first);
        }
    }

    /// The extremes of both operands: weights −128 and 127 (a GGUF may hold −128 although
    /// llama.cpp's quantizer never writes it) against activations ±127 give the largest
    /// 16-bit pair sums of the AVX2 kernel (2 · 128 · 127); nothing saturates.
    #[test]
    fn extreme_bytes_do_not_saturate() {
        let (n, k) = (16, 64);
        let nb = k / QK;
        let mut bytes = Vec::new();
        for c in 0..n {
            for b in 0..nb {
                bytes.extend_from_slice(&half::f16::from_f32(0.5 + c as f32 / 8.0).to_le_bytes());
                for i in 0..QK {
                    let v: i8 = if (c + b + i) % 3 == 0 { 127 } else { i8::MIN };
                    bytes.push(v as u8);
                }
            }
        }
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            &Device::Cpu,
            GgmlDType::Q8_0,
        )
        .unwrap();
        let q = QTensor::new(storage, (n, k)).unwrap();
        let tiles = Q8Tiles::pack(&q).unwrap().unwrap();
        // ±1 of one block: activations quantize to exactly ±127
        let m = 2;
        let x: Vec<f32> = (0..m * k)
            .map(|i| if (i / 7) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let want = scalar(&q, &x, m);
        let kernels = runnable();
        if kernels.is_empty() {
            assert!(!available());
            return;
        }
        for kern in kernels {
            assert_close(kern, &tiles.matmul_with(kern, m, &x), &want);
        }
    }
}
