//! Fused training ops with hand-written backward passes: RMSNorm, RoPE over halves, scaled
//! causal softmax and SwiGLU.
//!
//! Written out in candle's elementary ops these take 5–8 passes each way plus a zero-filled
//! gradient buffer per node; as candle custom ops they take one pass forward and one back.
//! Unlike candle's own fused kernels (which have no backward and silently stop gradients),
//! each one here implements `bwd`, and the finite-difference test of the calibration model
//! checks all of them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::Result;

/// Floats the ops run on (f32 for training, f64 for gradient checks).
pub trait Float: WithDType + Send + Sync + 'static {
    fn exp(self) -> Self;
}
impl Float for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}
impl Float for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

type CResult<T> = candle_core::Result<T>;

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op needs a contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// A tensor's elements in order.
pub(crate) fn values<T: WithDType>(t: &Tensor) -> CResult<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn tensor<T: WithDType>(v: Vec<T>, like: &Tensor) -> CResult<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// Runs `$body` with `$T` bound to the storage's float type.
macro_rules! by_dtype {
    ($s:expr, $T:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            _ => Err(candle_core::Error::Msg(
                "training ops need f32 or f64".into(),
            )),
        }
    };
}

macro_rules! by_tensor_dtype {
    ($t:expr, $T:ident => $body:expr) => {
        match $t.dtype() {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            _ => Err(candle_core::Error::Msg(
                "training ops need f32 or f64".into(),
            )),
        }
    };
}

/// A one-input op over contiguous slices; [`Op`] runs it as a candle op in f32 or f64.
/// `last` is the length of the input's last dimension.
trait Unary: Send + Sync {
    const NAME: &'static str;
    fn forward<T: Float>(&self, x: &[T], last: usize) -> Vec<T>;
    /// The input's gradient from the output and the output's gradient.
    fn backward<T: Float>(&self, y: &[T], dy: &[T], last: usize) -> Vec<T>;
}

/// A two-input op over contiguous slices (the output has the first input's shape).
trait Binary: Send + Sync {
    const NAME: &'static str;
    fn forward<T: Float>(&self, a: &[T], b: &[T]) -> Vec<T>;
    /// Both inputs' gradients from the inputs and the output's gradient.
    fn backward<T: Float>(&self, a: &[T], b: &[T], dy: &[T]) -> (Vec<T>, Vec<T>);
}

/// A [`Unary`] or [`Binary`] op as candle's custom op.
struct Op<O>(O);

impl<O: Unary> CustomOp1 for Op<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let last = *l.shape().dims().last().unwrap_or(&1);
        by_dtype!(s, T => {
            let y = self.0.forward::<T>(slice(s, l)?, last);
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let last = x.dim(candle_core::D::Minus1)?;
        by_tensor_dtype!(x, T => {
            let dx = self.0.backward::<T>(&values(y)?, &values(dy)?, last);
            Ok(Some(tensor(dx, x)?))
        })
    }
}

impl<O: Binary> CustomOp2 for Op<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1, T => {
            let y = self.0.forward::<T>(slice(s1, l1)?, slice(s2, l2)?);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        by_tensor_dtype!(a, T => {
            let (da, db) = self.0.backward::<T>(&values(a)?, &values(b)?, &values(dy)?);
            Ok((Some(tensor(da, a)?), Some(tensor(db, b)?)))
        })
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm: y = x · r · w, r = 1 / sqrt(mean(x²) + eps), over the last dimension.

struct RmsNorm {
    eps: f64,
}

fn rms_fwd<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
            let r = T::from_f64(1.0 / (ms + eps).sqrt());
            for ((yo, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *yo = xi * r * wi;
            }
        });
    y
}

/// (dx, dw) of RMSNorm.
fn rms_bwd<T: Float>(x: &[T], w: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let d = w.len();
    let mut dx = vec![T::from_f64(0.0); x.len()];
    let dw_rows: Vec<Vec<f64>> = dx
        .par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .fold(
            || vec![0.0f64; d],
            |mut acc, (dxr, (xr, dyr))| {
                let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                let s: f64 = (0..d)
                    .map(|i| dyr[i].to_f64() * w[i].to_f64() * xr[i].to_f64())
                    .sum();
                let k = r * r * r * s / d as f64;
                for i in 0..d {
                    let (xi, dyi) = (xr[i].to_f64(), dyr[i].to_f64());
                    dxr[i] = T::from_f64(r * dyi * w[i].to_f64() - xi * k);
                    acc[i] += dyi * xi * r;
                }
                acc
            },
        )
        .collect();
    let mut dw = vec![0.0f64; d];
    for row in dw_rows {
        for (a, b) in dw.iter_mut().zip(row) {
            *a += b;
        }
    }
    (dx, dw.into_iter().map(T::from_f64).collect())
}

impl Binary for RmsNorm {
    const NAME: &'static str = "train-rms-norm";
    fn forward<T: Float>(&self, x: &[T], w: &[T]) -> Vec<T> {
        rms_fwd(x, w, self.eps)
    }
    fn backward<T: Float>(&self, x: &[T], w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        rms_bwd(x, w, dy, self.eps)
    }
}

/// RMSNorm over the last dimension with gain `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(w, Op(RmsNorm { eps }))?)
}

// ---------------------------------------------------------------------------------------
// RoPE over halves on (batch, len, heads, head_dim): y1 = x1 c − x2 s, y2 = x2 c + x1 s.

#[derive(Clone)]
struct Rope {
    len: usize,
    heads: usize,
    /// `(len, head_dim / 2)` angles' cosines and sines.
    cos: std::sync::Arc<Vec<f64>>,
    sin: std::sync::Arc<Vec<f64>>,
}

fn rope_apply<T: Float>(x: &[T], r: &Rope, hd: usize, sign: f64) -> Vec<T> {
    let half = hd / 2;
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(hd)
        .zip(x.par_chunks(hd))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let pos = (row / r.heads) % r.len;
            let (c, s) = (&r.cos[pos * half..], &r.sin[pos * half..]);
            for i in 0..half {
                let (x1, x2) = (xr[i].to_f64(), xr[i + half].to_f64());
                let (ci, si) = (c[i], sign * s[i]);
                yr[i] = T::from_f64(x1 * ci - x2 * si);
                yr[i + half] = T::from_f64(x2 * ci + x1 * si);
            }
        });
    y
}

impl Unary for Rope {
    const NAME: &'static str = "train-rope";
    fn forward<T: Float>(&self, x: &[T], head_dim: usize) -> Vec<T> {
        rope_apply(x, self, head_dim, 1.0)
    }
    fn backward<T: Float>(&self, _y: &[T], dy: &[T], head_dim: usize) -> Vec<T> {
        // The transpose of a rotation is the rotation by the opposite angle.
        rope_apply(dy, self, head_dim, -1.0)
    }
}

/// Rotary embeddings (Hugging Face "rotate half" layout) for `x` of shape
/// `(batch, len, heads, head_dim)`, positions `0..len`.
pub fn rope(x: &Tensor, theta: f64) -> Result<Tensor> {
    let (_, len, heads, hd) = x.dims4()?;
    let half = hd / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(len * half),
        Vec::with_capacity(len * half),
    );
    for p in 0..len {
        for i in 0..half {
            let a = p as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let op = Rope {
        len,
        heads,
        cos: cos.into(),
        sin: sin.into(),
    };
    Ok(x.contiguous()?.apply_op1(Op(op))?)
}

// ---------------------------------------------------------------------------------------
// Scaled causal softmax over the last dimension of (…, len, len) scores.

struct CausalSoftmax {
    scale: f64,
}

#[allow(clippy::assign_op_pattern)] // T has no *= bound
fn causal_softmax_fwd<T: Float>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let n = row % t + 1; // keys 0..=query position
            let max = xr[..n]
                .iter()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
            let mut sum = 0.0;
            for j in 0..n {
                let e = ((xr[j].to_f64() - max) * scale).exp();
                yr[j] = T::from_f64(e);
                sum += e;
            }
            let inv = T::from_f64(1.0 / sum);
            for v in &mut yr[..n] {
                *v = *v * inv;
            }
        });
    y
}

fn causal_softmax_bwd<T: Float>(y: &[T], dy: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); y.len()];
    dx.par_chunks_mut(t)
        .zip(y.par_chunks(t).zip(dy.par_chunks(t)))
        .enumerate()
        .for_each(|(row, (dxr, (yr, dyr)))| {
            let n = row % t + 1;
            let dot: f64 = (0..n).map(|j| yr[j].to_f64() * dyr[j].to_f64()).sum();
            for j in 0..n {
                dxr[j] = T::from_f64(scale * yr[j].to_f64() * (dyr[j].to_f64() - dot));
            }
        });
    dx
}

impl Unary for CausalSoftmax {
    const NAME: &'static str = "train-causal-softmax";
    fn forward<T: Float>(&self, x: &[T], len: usize) -> Vec<T> {
        causal_softmax_fwd(x, len, self.scale)
    }
    fn backward<T: Float>(&self, y: &[T], dy: &[T], len: usize) -> Vec<T> {
        causal_softmax_bwd(y, dy, len, self.scale)
    }
}

/// `softmax(scale · x)` over keys `0..=query` of square `(…, len, len)` scores (the rest 0).
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Op(CausalSoftmax { scale }))?)
}

// ---------------------------------------------------------------------------------------
// SwiGLU: silu(a) · b.

struct SwiGlu;

fn sigmoid(a: f64) -> f64 {
    1.0 / (1.0 + (-a).exp())
}

impl Binary for SwiGlu {
    const NAME: &'static str = "train-swiglu";
    fn forward<T: Float>(&self, a: &[T], b: &[T]) -> Vec<T> {
        a.par_iter()
            .zip(b.par_iter())
            .map(|(&a, &b)| {
                let a = a.to_f64();
                T::from_f64(a * sigmoid(a) * b.to_f64())
            })
            .collect()
    }
    fn backward<T: Float>(&self, a: &[T], b: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        a.par_iter()
            .zip(b.par_iter().zip(dy.par_iter()))
            .map(|(&a, (&b, &g))| {
                let (a, b, g) = (a.to_f64(), b.to_f64(), g.to_f64());
                let s = sigmoid(a);
                let silu = a * s;
                let dsilu = s * (1.0 + a * (1.0 - s));
                (T::from_f64(g * b * dsilu), T::from_f64(g * silu))
            })
            .unzip()
    }
}

/// `silu(a) · b` elementwise.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, Op(SwiGlu))?)
}
