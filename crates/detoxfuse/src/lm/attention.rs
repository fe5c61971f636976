//! Pieces every decoder family shares: the KV cache, rotary tables and grouped-query
//! attention with causal (optionally sliding-window) masking.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every layer for a batch of sequences.
///
/// Each layer's K and V live in a buffer `(batch, kv_heads, capacity, head_dim)` that grows by
/// doubling; a step writes its positions in place and attention reads a view of the first
/// `len` positions. (Concatenating per step instead copies the whole cache every token, which
/// measured as most of the time of batched decoding.)
///
/// Rows usually advance in lockstep. After [`KvCache::append_rows`] (sequences prefilled
/// apart, then decoded together) each row has a length of its own: decode steps (one new
/// token per row) then write and attend per row; a multi-token step is refused.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions filled in the buffers: every row's length in lockstep, the longest row's
    /// otherwise.
    len: usize,
    /// Each row's length when rows differ; empty in lockstep.
    rows: Vec<usize>,
}

const INITIAL_CAPACITY: usize = 128;

impl Clone for KvCache {
    /// A deep copy: buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        let copy = |t: &Tensor| t.copy().expect("copying a CPU tensor");
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (copy(k), copy(v))))
                .collect(),
            len: self.len,
            rows: self.rows.clone(),
        }
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            rows: Vec::new(),
        }
    }

    /// Each row's length when the rows differ ([`KvCache::append_rows`]); `None` in lockstep.
    pub fn row_lens(&self) -> Option<&[usize]> {
        (!self.rows.is_empty()).then_some(self.rows.as_slice())
    }

    /// Adds `other`'s rows after this cache's (e.g. a request prefilled on its own joining
    /// a running batch); the rows keep their own lengths.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if other.layers.len() != self.layers.len() {
            return Err(Error::Input(format!(
                "cannot merge a cache of {} layers into one of {}",
                other.layers.len(),
                self.layers.len()
            )));
        }
        if self.layers.iter().all(Option::is_none) {
            *self = other;
            return Ok(());
        }
        if other.layers.iter().all(Option::is_none) {
            return Ok(());
        }
        let mut rows = self.row_lens_or_lockstep();
        rows.extend(other.row_lens_or_lockstep());
        let len = self.len.max(other.len);
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            let (Some((ak, av)), Some((bk, bv))) = (mine.as_ref(), theirs) else {
                return Err(Error::Input(
                    "cannot merge caches whose layers are not all filled".into(),
                ));
            };
            let (b1, h, c1, d) = ak.dims4()?;
            let (b2, _, c2, _) = bk.dims4()?;
            let cap = c1.max(c2);
            let join = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                let out = Tensor::zeros((b1 + b2, h, cap, d), a.dtype(), &Device::Cpu)?;
                out.narrow(0, 0, b1)?.slice_set(&a.contiguous()?, 2, 0)?;
                out.narrow(0, b1, b2)?.slice_set(&b.contiguous()?, 2, 0)?;
                Ok(out)
            };
            *mine = Some((join(ak, &bk)?, join(av, &bv)?));
        }
        self.len = len;
        self.rows = rows;
        self.settle();
        Ok(())
    }

    /// Back to lockstep once every row has the same length.
    fn settle(&mut self) {
        if let Some(&first) = self.rows.first() {
            if self.rows.iter().all(|&l| l == first) {
                self.len = first;
                self.rows.clear();
            }
        }
    }

    fn row_lens_or_lockstep(&self) -> Vec<usize> {
        match self.row_lens() {
            Some(r) => r.to_vec(),
            None => vec![self.len; self.batch()],
        }
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences in the batch (1 for an empty cache).
    pub fn batch(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(1, |(k, _)| k.dim(0).unwrap_or(1))
    }

    /// Forgets every position from `len` on (roll back), keeping the first `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        for r in &mut self.rows {
            *r = (*r).min(len);
        }
        Ok(())
    }

    /// Turns a batch-1 cache (a processed prompt) into `n` identical rows, so that `n`
    /// samples continue the same prefix without recomputing it.
    pub fn repeat_batch(&mut self, n: usize) -> Result<()> {
        if self.batch() != 1 {
            return Err(Error::Input(format!(
                "repeat_batch needs a batch-1 cache, this one holds {}",
                self.batch()
            )));
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.repeat((n, 1, 1, 1))?;
            *v = v.repeat((n, 1, 1, 1))?;
        }
        Ok(())
    }

    /// Rolls row `r` back to its first `len` positions (the others keep theirs); the rows then
    /// differ in length until [`KvCache::settle`] finds them equal again.
    pub fn truncate_row(&mut self, r: usize, len: usize) -> Result<()> {
        let b = self.batch();
        if r >= b {
            return Err(Error::Input(format!(
                "row {r} is outside this cache's {b} rows"
            )));
        }
        if self.rows.is_empty() {
            self.rows = vec![self.len; b];
        }
        self.rows[r] = self.rows[r].min(len);
        self.settle();
        Ok(())
    }

    /// Keeps only the batch rows listed (e.g. samples that have not finished); none left is
    /// an empty cache.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            *self = Self::new(self.layers.len());
            return Ok(());
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &Device::Cpu,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        if !self.rows.is_empty() {
            self.rows = rows.iter().map(|&r| self.rows[r]).collect();
            // the longest row that is left
            self.len = self.rows.iter().copied().max().unwrap_or(self.len);
            self.settle();
        }
        Ok(())
    }

    /// Writes this step's keys/values `(b, kv_heads, t, d)` for `layer` after the cached
    /// positions and returns views of all of them.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if !self.rows.is_empty() && t != 1 {
            return Err(Error::Input(format!(
                "rows of different lengths append one position a step, not {t}"
            )));
        }
        let need = self.len + t;
        let slot = &mut self.layers[layer];
        let grow = match slot {
            None => true,
            Some((bk, _)) => bk.dim(2)? < need || bk.dim(0)? != b,
        };
        if grow {
            let cap = need.next_power_of_two().max(INITIAL_CAPACITY);
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), &Device::Cpu)?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), &Device::Cpu)?;
            if let Some((ok, ov)) = slot.as_ref() {
                if self.len > 0 {
                    nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some((nk, nv));
        }
        let (bk, bv) = slot.as_ref().expect("allocated above");
        if self.rows.is_empty() {
            bk.slice_set(&k.contiguous()?, 2, self.len)?;
            bv.slice_set(&v.contiguous()?, 2, self.len)?;
        } else {
            for (r, &at) in self.rows.iter().enumerate() {
                bk.narrow(0, r, 1)?
                    .slice_set(&k.narrow(0, r, 1)?.contiguous()?, 2, at)?;
                bv.narrow(0, r, 1)?
                    .slice_set(&v.narrow(0, r, 1)?.contiguous()?, 2, at)?;
            }
        }
        Ok((bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?))
    }

    /// Called once per forward, after every layer appended `n` positions.
    pub(crate) fn advance(&mut self, n: usize) {
        for r in &mut self.rows {
            *r += n;
        }
        self.len = self.rows.iter().copied().max().unwrap_or(self.len + n);
    }
}

/// Where one forward's new positions go in a cache ([`crate::lm::ModelInfo::start`]).
#[derive(Debug, Clone)]
pub struct Positions {
    /// Positions already cached (the longest row's when rows differ).
    pub offset: usize,
    /// Each row's length when the cache's rows differ (one new token per row): where its
    /// token goes, and how many cached keys it reads besides its own.
    pub rows: Option<Vec<usize>>,
}

/// How a checkpoint lays out the two halves rotated by RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x0, x1), (x2, x3)…: llama GGUF files (llama.cpp permutes Q/K to this).
    Interleaved,
    /// First half against second half: Hugging Face checkpoints, gemma GGUF (NEOX).
    Halves,
}

/// Precomputed cos/sin tables for RoPE.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    pub fn new(head_dim: usize, base: f32, max_len: usize, style: RopeStyle) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                // f64 keeps large positions × frequencies accurate before rounding to f32.
                let a = p as f64 * *f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_len, half), &Device::Cpu)?,
            style,
        })
    }

    /// Rotates `x` of shape `(b, heads, seq, head_dim)` whose first position is `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        self.rotate(x, &cos, &sin)
    }

    /// Rotates a forward's new positions `x` where [`Positions`] puts them.
    pub fn apply_at(&self, x: &Tensor, at: &Positions) -> Result<Tensor> {
        match &at.rows {
            Some(rows) => self.apply_rows(x, rows),
            None => self.apply(x, at.offset),
        }
    }

    /// Rotates `x` of shape `(b, heads, 1, head_dim)` whose row `r` is at `positions[r]`.
    pub fn apply_rows(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let b = x.dim(0)?;
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::from_vec(idx, b, &Device::Cpu)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&idx, 0)?.reshape((b, 1, half))?;
        let sin = self.sin.index_select(&idx, 0)?.reshape((b, 1, half))?;
        self.rotate(x, &cos, &sin)
    }

    /// `cos`/`sin` are contiguous: a narrowed table, or rows picked from it.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        })
    }
}

/// Scaled dot-product attention with grouped KV heads.
///
/// `q`: `(b, n_head, t, d)`, `k`/`v`: `(b, n_kv, L, d)` with the last `t` of the `L` positions
/// being the queries' own. Query head `h` reads KV head `h / (n_head / n_kv)`; instead of
/// repeating K/V we fold the group into the query rows, `(b, n_kv, g·t, d)`, which is the same
/// product without copies. Returns `(b, t, n_head·d)`. With `row_lens` (a cache whose rows
/// differ in length, `t` = 1), row `r` reads only its first `row_lens[r] + 1` keys: its cached
/// ones and its own.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
    row_lens: Option<&[usize]>,
) -> Result<Tensor> {
    let (b, n_head, t, d) = q.dims4()?;
    let (_, n_kv, l, _) = k.dims4()?;
    let g = n_head / n_kv;
    let q = q.contiguous()?.reshape((b, n_kv, g * t, d))?;
    let out = if t == 1 {
        decode_attention(&q, k, v, scale as f32, window, row_lens)?
    } else if row_lens.is_some() {
        return Err(Error::Input(
            "rows of different lengths attend one token at a time".into(),
        ));
    } else {
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let mask = causal_mask(t, l - t, window, g)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        probs.matmul(&v.contiguous()?)?
    }; // (b, n_kv, g·t, d)
    Ok(out
        .reshape((b, n_head, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, n_head * d))?)
}

/// One new position per sequence: a plain loop over the cached keys, reading the cache
/// buffers in place. candle's batched matmul costs ~55 µs per call at these sizes (a
/// 3×64 by 64×100 product), two calls per layer and token; this is a few µs.
fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
    row_lens: Option<&[usize]>,
) -> Result<Tensor> {
    let (b, n_kv, rows, d) = q.dims4()?;
    let all = k.dim(2)?;
    let qv: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Err(Error::Input("attention runs on the CPU".into()));
    };
    let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        return Err(Error::Input(
            "attention expects K/V rows to be contiguous".into(),
        ));
    }
    let mut out = vec![0f32; b * n_kv * rows * d];
    let out_addr = out.as_mut_ptr() as usize;
    // (sequence, kv head) pairs are independent: spread them over candle's worker pool
    candle_core::utils::barrier_pool().execute_chunked(b * n_kv, |items| {
        let mut scores = vec![0f32; all];
        for item in items {
            let (bi, h) = (item / n_kv, item % n_kv);
            let l = row_lens.map_or(all, |r| r[bi] + 1);
            let first = window.map_or(0, |w| l.saturating_sub(w)); // llama.cpp: p - j < w
            let kbase = kl.start_offset() + bi * kst[0] + h * kst[1];
            let vbase = vl.start_offset() + bi * vst[0] + h * vst[1];
            // SAFETY: item owns rows [item·rows, (item+1)·rows) of `out`, disjoint per item;
            // `out` outlives this call.
            let o_item = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_addr as *mut f32).add(item * rows * d),
                    rows * d,
                )
            };
            for r in 0..rows {
                let qi = &qv[(item * rows + r) * d..][..d];
                let mut max = f32::NEG_INFINITY;
                for j in first..l {
                    let kj = &kd[kbase + j * kst[2]..][..d];
                    let s = dot(qi, kj) * scale;
                    scores[j] = s;
                    max = max.max(s);
                }
                let mut sum = 0f32;
                for s in &mut scores[first..l] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut o_item[r * d..(r + 1) * d];
                for j in first..l {
                    let p = scores[j] / sum;
                    let vj = &vd[vbase + j * vst[2]..][..d];
                    for (oi, vv) in o.iter_mut().zip(vj) {
                        *oi += p * vv;
                    }
                }
            }
        }
    });
    drop((ks, vs));
    Ok(Tensor::from_vec(out, (b, n_kv, rows, d), &Device::Cpu)?)
}

/// Dot product with eight partial sums, so that it vectorizes (a single running sum is a
/// serial chain the compiler may not reorder).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Additive mask `(g·t, offset + t)`: query `i` (absolute position `offset + i`) sees key `j`
/// iff `j <= offset + i` and, with a window `w`, `offset + i - j < w` (llama.cpp's rule).
fn causal_mask(t: usize, offset: usize, window: Option<usize>, g: usize) -> Result<Tensor> {
    let l = offset + t;
    let mut m = Vec::with_capacity(g * t * l);
    for _ in 0..g {
        for i in 0..t {
            let p = offset + i;
            for j in 0..l {
                let visible = j <= p && window.is_none_or(|w| p - j < w);
                m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Ok(Tensor::from_vec(m, (g * t, l), &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// Reshapes projected `(b, t, heads·d)` into `(b, heads, t, d)`.
pub fn split_heads(x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, d))?.transpose(1, 2)?)
}

/// Root-mean-square normalisation over the last dimension (inference only: fused op).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?)
}
