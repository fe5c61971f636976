//! Pieces every decoder family shares: the KV cache, rotary tables and grouped-query
//! attention with causal (optionally sliding-window) masking.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every layer for a batch of sequences.
///
/// Each layer's K and V live in a buffer `(row capacity, kv_heads, capacity, head_dim)` that
/// grows by doubling in both; a step writes its positions in place and attention reads a view
/// of the first `batch` rows and `len` positions. (Concatenating per step instead copies the
/// whole cache every token, which measured as most of the time of batched decoding; and
/// reallocating when a sequence joins or leaves a running batch copied every row each time.)
///
/// Rows usually advance in lockstep. After [`KvCache::append_rows`] (sequences prefilled
/// apart, then decoded together) each row has a length of its own: decode steps (one new
/// token per row) then write and attend per row; a multi-token step is refused.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Rows in use (the first `batch` of each buffer).
    batch: usize,
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
            batch: self.batch,
            len: self.len,
            rows: self.rows.clone(),
        }
    }
}

/// A new buffer of `rows × positions` holding `parts` (each `(its rows, first positions)` of a
/// buffer) one after another.
fn gather(parts: &[(&Tensor, usize, usize)], rows: usize, positions: usize) -> Result<Tensor> {
    let (_, h, _, d) = parts[0].0.dims4()?;
    let out = Tensor::zeros((rows, h, positions, d), parts[0].0.dtype(), &Device::Cpu)?;
    let mut at = 0;
    for &(t, r, len) in parts {
        if r > 0 && len > 0 {
            out.narrow(0, at, r)?.slice_set(
                &t.narrow(0, 0, r)?.narrow(2, 0, len)?.contiguous()?,
                2,
                0,
            )?;
        }
        at += r;
    }
    Ok(out)
}

/// Rows `rows` of `t` (along its first dimension), in that order.
pub fn take_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Ok(t.index_select(&Tensor::from_vec(idx, rows.len(), t.device())?, 0)?)
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            batch: 0,
            len: 0,
            rows: Vec::new(),
        }
    }

    /// Each row's length when the rows differ ([`KvCache::append_rows`]); `None` in lockstep.
    pub fn row_lens(&self) -> Option<&[usize]> {
        (!self.rows.is_empty()).then_some(self.rows.as_slice())
    }

    fn is_unfilled(&self) -> bool {
        self.layers.iter().all(Option::is_none)
    }

    /// Adds `other`'s rows after this cache's (e.g. a request prefilled on its own joining
    /// a running batch); the rows keep their own lengths. Only `other`'s rows are copied
    /// while the buffers have room for them.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if other.layers.len() != self.layers.len() {
            return Err(Error::Input(format!(
                "cannot merge a cache of {} layers into one of {}",
                other.layers.len(),
                self.layers.len()
            )));
        }
        if self.is_unfilled() {
            *self = other;
            return Ok(());
        }
        if other.is_unfilled() {
            return Ok(());
        }
        let mut rows = self.row_lengths();
        rows.extend(other.row_lengths());
        let len = self.len.max(other.len);
        let (b1, b2) = (self.batch, other.batch);
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            let (Some((ak, av)), Some((bk, bv))) = (mine.as_mut(), theirs) else {
                return Err(Error::Input(
                    "cannot merge caches whose layers are not all filled".into(),
                ));
            };
            let (row_cap, _, cap, _) = ak.dims4()?;
            if b1 + b2 <= row_cap && len <= cap {
                for (dst, src) in [(&*ak, &bk), (&*av, &bv)] {
                    let src = src
                        .narrow(0, 0, b2)?
                        .narrow(2, 0, other.len)?
                        .contiguous()?;
                    dst.narrow(0, b1, b2)?.slice_set(&src, 2, 0)?;
                }
            } else {
                let (row_cap, cap) = ((b1 + b2).next_power_of_two(), cap.max(bk.dim(2)?));
                *ak = gather(&[(ak, b1, self.len), (&bk, b2, other.len)], row_cap, cap)?;
                *av = gather(&[(av, b1, self.len), (&bv, b2, other.len)], row_cap, cap)?;
            }
        }
        self.batch = b1 + b2;
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

    /// Each row's length, whether the rows differ or not.
    pub fn row_lengths(&self) -> Vec<usize> {
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
        if self.is_unfilled() {
            1
        } else {
            self.batch
        }
    }

    /// Forgets every position from `len` on (roll back), keeping the first `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        for r in &mut self.rows {
            *r = (*r).min(len);
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
            *k = k.narrow(0, 0, 1)?.repeat((n, 1, 1, 1))?;
            *v = v.narrow(0, 0, 1)?.repeat((n, 1, 1, 1))?;
        }
        if !self.is_unfilled() {
            self.batch = n;
        }
        Ok(())
    }

    /// Keeps only the batch rows listed (e.g. samples that have not finished); none left is
    /// an empty cache. Rows listed in order move down in place, in runs, over their filled
    /// positions only; any other list is gathered into new buffers.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            *self = Self::new(self.layers.len());
            return Ok(());
        }
        let b = self.batch();
        if let Some(&r) = rows.iter().find(|&&r| r >= b) {
            return Err(Error::Input(format!(
                "row {r} is outside this cache's {b} rows"
            )));
        }
        let in_order = rows.windows(2).all(|w| w[0] < w[1]);
        let len = self.len;
        for (k, v) in self.layers.iter_mut().flatten() {
            for t in [k, v] {
                if in_order {
                    // Runs of rows that move by the same amount, copied once each (through a
                    // temporary: a buffer cannot be read and written in one call).
                    let mut j = 0;
                    while j < rows.len() {
                        let mut end = j + 1;
                        while end < rows.len() && rows[end] == rows[j] + (end - j) {
                            end += 1;
                        }
                        if rows[j] != j && len > 0 {
                            let run = t
                                .narrow(0, rows[j], end - j)?
                                .narrow(2, 0, len)?
                                .force_contiguous()?;
                            t.narrow(0, j, end - j)?.slice_set(&run, 2, 0)?;
                        }
                        j = end;
                    }
                } else {
                    *t = take_rows(t, rows)?;
                }
            }
        }
        self.batch = rows.len();
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
        if self.is_unfilled() {
            self.batch = b;
        } else if b != self.batch {
            return Err(Error::Input(format!(
                "a step of {b} rows on a cache of {} rows",
                self.batch
            )));
        }
        let need = self.len + t;
        let slot = &mut self.layers[layer];
        let grow = match slot {
            None => true,
            Some((bk, _)) => bk.dim(2)? < need || bk.dim(0)? < b,
        };
        if grow {
            let cap = need.next_power_of_two().max(INITIAL_CAPACITY);
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), &Device::Cpu)?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), &Device::Cpu)?;
            if let Some((ok, ov)) = slot.as_ref() {
                if self.len > 0 {
                    let old = |t: &Tensor| t.narrow(0, 0, b)?.narrow(2, 0, self.len)?.contiguous();
                    nk.slice_set(&old(ok)?, 2, 0)?;
                    nv.slice_set(&old(ov)?, 2, 0)?;
                }
            }
            *slot = Some((nk, nv));
        }
        let (bk, bv) = slot.as_ref().expect("allocated above");
        let (bk, bv) = (bk.narrow(0, 0, b)?, bv.narrow(0, 0, b)?);
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
        let half = self.cos.dim(1)?;
        let cos = take_rows(&self.cos, positions)?.reshape((b, 1, half))?;
        let sin = take_rows(&self.sin, positions)?.reshape((b, 1, half))?;
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

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// A one-layer cache of `b` rows holding `t` positions of distinct values.
    fn filled(b: usize, t: usize, base: f32) -> KvCache {
        let mut c = KvCache::new(1);
        let n = b * 2 * t * 3;
        let v: Vec<f32> = (0..n).map(|i| base + i as f32).collect();
        let k = Tensor::from_vec(v, (b, 2, t, 3), &Device::Cpu).unwrap();
        c.append(0, k.clone(), (k * 2.0).unwrap()).unwrap();
        c.advance(t);
        c
    }

    fn rows_of(c: &KvCache) -> Vec<Vec<f32>> {
        let (k, _) = c.layers[0].as_ref().unwrap();
        (0..c.batch())
            .map(|r| {
                k.narrow(0, r, 1)
                    .unwrap()
                    .narrow(2, 0, c.len())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    /// Rows that leave are closed up in place (in order) or gathered (any other order), and
    /// rows that join use the buffers' spare rows: each row keeps exactly its own values.
    #[test]
    fn rows_leave_and_join_keeping_their_own_values() {
        let mut c = filled(5, 4, 0.0);
        let before = rows_of(&c);
        c.select_rows(&[0, 2, 3]).unwrap();
        assert_eq!(
            rows_of(&c),
            vec![before[0].clone(), before[2].clone(), before[3].clone()]
        );
        // 3 of the buffer's 5 rows in use: a 2-row cache joins without a new buffer
        let joining = filled(2, 4, 1000.0);
        let new_rows = rows_of(&joining);
        let buffer = c.layers[0].as_ref().unwrap().0.dims4().unwrap().0;
        c.append_rows(joining).unwrap();
        assert_eq!(c.layers[0].as_ref().unwrap().0.dims4().unwrap().0, buffer);
        let mut want = vec![before[0].clone(), before[2].clone(), before[3].clone()];
        want.extend(new_rows);
        assert_eq!(rows_of(&c), want);
        c.select_rows(&[4, 1]).unwrap();
        assert_eq!(rows_of(&c), vec![want[4].clone(), want[1].clone()]);
        assert!(c.select_rows(&[2]).is_err(), "row 2 of 2 rows");
        c.select_rows(&[]).unwrap();
        assert_eq!((c.batch(), c.len()), (1, 0));
    }
}
