//! A "tuned lens" head for the truncated calibration model.
//!
//! The first L layers of a base LM followed by its final norm and tied head are not a language
//! model: on held-back text they score about −18 nats per token, worse than a uniform guess.
//! Any training then raises the probability of everything, and "the trained model assigns
//! less probability to toxic text than its initialisation" can never hold. The lens makes
//! the initialisation a language model before any training: a linear map `W` (hidden ×
//! hidden) from the truncated model's final hidden states to the whole base model's, fitted
//! by ridge regression on the base's own hidden states over corpus text (no labels, no
//! toxicity signal), folded into an untied head `E · Wᵀ`. The model stays a plain Llama
//! (`tie_word_embeddings = false`), so the Hugging Face export is unchanged.

use candle_core::{DType, Tensor};

use super::data::{self, Example};
use super::model::make_batch;
use super::model::CalibrationModel;
use crate::error::{Error, Result};

/// The items a lens is fitted on: every `len / texts`-th from the start, at most `texts`.
pub fn sample<T: Clone>(items: &[T], texts: usize) -> Vec<T> {
    let step = (items.len() / texts.max(1)).max(1);
    items.iter().step_by(step).take(texts).cloned().collect()
}

/// Hidden-state pairs `(truncated, full)` as row-major f64 matrices `(n, d)`, over every
/// scored position of `examples`.
pub fn hidden_pairs(
    truncated: &CalibrationModel,
    full: &CalibrationModel,
    examples: &[Example],
    batch_tokens: usize,
    pad: u32,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let d = truncated.config.hidden_size;
    if full.config.hidden_size != d {
        return Err(Error::Input(format!(
            "the truncated model is {d} wide but the full model {} wide",
            full.config.hidden_size
        )));
    }
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for b in data::ordered_batches(examples, batch_tokens) {
        let batch = make_batch(examples, &b, pad)?;
        for (m, out) in [(truncated, &mut xs), (full, &mut ys)] {
            let h = m.scored_hidden(&batch)?.to_dtype(DType::F64)?;
            out.extend(h.flatten_all()?.to_vec1::<f64>()?);
        }
    }
    let n = xs.len() / d;
    Ok((xs, ys, n))
}

/// Ridge regression `W = (XᵀX + λI)⁻¹ XᵀY` with `λ = ridge · trace(XᵀX) / d`, returned as
/// an f32 `(d, d)` tensor such that `x · W ≈ y`.
pub fn fit(x: &[f64], y: &[f64], n: usize, d: usize, ridge: f64) -> Result<Tensor> {
    if n < d {
        return Err(Error::Input(format!(
            "fitting the lens needs at least {d} token positions, got {n}; use more text"
        )));
    }
    fit_map(x, y, n, (d, d), ridge)
}

/// [`fit`] for a map between widths: `x` is `(n, dx)`, `y` is `(n, dy)`, the result `(dx, dy)`.
pub fn fit_map(
    x: &[f64],
    y: &[f64],
    n: usize,
    (dx, dy): (usize, usize),
    ridge: f64,
) -> Result<Tensor> {
    // With fewer positions than inputs only the ridge keeps the system solvable.
    if n == 0 || (n < dx && ridge <= 0.0) {
        return Err(Error::Input(format!(
            "fitting a linear map from width {dx} needs at least {dx} token positions (or a ridge), got {n}; use more text"
        )));
    }
    let mut g = vec![0.0f64; dx * dx];
    let mut r = vec![0.0f64; dx * dy];
    for t in 0..n {
        let (xr, yr) = (&x[t * dx..(t + 1) * dx], &y[t * dy..(t + 1) * dy]);
        for i in 0..dx {
            let xi = xr[i];
            let gi = &mut g[i * dx..(i + 1) * dx];
            for j in 0..dx {
                gi[j] += xi * xr[j];
            }
            let ri = &mut r[i * dy..(i + 1) * dy];
            for j in 0..dy {
                ri[j] += xi * yr[j];
            }
        }
    }
    let trace: f64 = (0..dx).map(|i| g[i * dx + i]).sum();
    let lambda = ridge * trace / dx as f64;
    for i in 0..dx {
        g[i * dx + i] += lambda;
    }
    let d = dx;
    let l = cholesky(&g, d)?;
    // Solve G · W = R column by column: L z = r, Lᵀ w = z.
    let mut w = vec![0.0f64; dx * dy];
    let mut col = vec![0.0f64; d];
    for c in 0..dy {
        for i in 0..d {
            let mut s = r[i * dy + c];
            for k in 0..i {
                s -= l[i * d + k] * col[k];
            }
            col[i] = s / l[i * d + i];
        }
        for i in (0..d).rev() {
            let mut s = col[i];
            for k in i + 1..d {
                s -= l[k * d + i] * w[k * dy + c];
            }
            w[i * dy + c] = s / l[i * d + i];
        }
    }
    let w: Vec<f32> = w.into_iter().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(w, (dx, dy), &candle_core::Device::Cpu)?)
}

/// Lower-triangular `L` with `L Lᵀ = a` (symmetric positive definite, row-major).
fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return Err(Error::Input(
                        "the lens's normal equations are not positive definite; raise the ridge"
                            .into(),
                    ));
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Ok(l)
}

/// Reads a lens matrix (tensor `lens`, `hidden × hidden`) written by the trainer.
pub fn read(path: &std::path::Path) -> Result<Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::Input(format!("reading the lens {}: {e}", path.display())))?
        .remove("lens")
        .ok_or_else(|| Error::Input(format!("{} has no tensor `lens`", path.display())))
}

/// `model` with its head replaced by the lens head `E · Wᵀ` (`E` its token embeddings).
pub fn apply(model: CalibrationModel, w: &Tensor) -> Result<CalibrationModel> {
    let d = model.config.hidden_size;
    if w.dims() != [d, d] {
        return Err(Error::Input(format!(
            "a lens of shape {:?} does not fit a model of width {d}",
            w.dims()
        )));
    }
    let e = model.get("model.embed_tokens.weight")?;
    let head = e.matmul(&w.to_dtype(e.dtype())?.t()?)?;
    model.with_untied_head(head)
}

/// Mean squared error of `x · W` against `y`, relative to `y`'s mean square (1 = no better
/// than predicting zero).
pub fn relative_error(x: &[f64], y: &[f64], n: usize, d: usize, w: &Tensor) -> Result<f64> {
    let w = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut err, mut norm) = (0.0, 0.0);
    let mut pred = vec![0.0f64; d];
    for t in 0..n {
        let (xr, yr) = (&x[t * d..(t + 1) * d], &y[t * d..(t + 1) * d]);
        pred.iter_mut().for_each(|p| *p = 0.0);
        for (i, &xi) in xr.iter().enumerate() {
            for (p, wij) in pred.iter_mut().zip(&w[i * d..(i + 1) * d]) {
                *p += xi * wij;
            }
        }
        for j in 0..d {
            err += (pred[j] - yr[j]).powi(2);
            norm += yr[j].powi(2);
        }
    }
    Ok(err / norm.max(f64::MIN_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_known_linear_map() {
        // x random-ish, y = x · W_true: with a tiny ridge the fit returns W_true.
        let (n, d) = (64, 4);
        let w_true = [
            1.0, 0.5, 0.0, -1.0, 0.0, 2.0, 0.3, 0.0, -0.5, 0.0, 1.0, 0.2, 0.1, 0.1, 0.1, 0.1,
        ];
        let mut x = Vec::new();
        let mut s = 1u64;
        for _ in 0..n * d {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x.push(((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5);
        }
        let mut y = vec![0.0; n * d];
        for t in 0..n {
            for j in 0..d {
                y[t * d + j] = (0..d).map(|i| x[t * d + i] * w_true[i * d + j]).sum();
            }
        }
        let w = fit(&x, &y, n, d, 1e-12).unwrap();
        let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, t) in got.iter().zip(w_true) {
            assert!((*g as f64 - t).abs() < 1e-5, "{got:?}");
        }
        assert!(relative_error(&x, &y, n, d, &w).unwrap() < 1e-10);
    }

    #[test]
    fn too_few_positions_is_an_input_error() {
        let err = fit(&[0.0; 6], &[0.0; 6], 2, 3, 1e-3).unwrap_err();
        assert!(
            err.to_string().contains("at least 3 token positions"),
            "{err}"
        );
    }
}
