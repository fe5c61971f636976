//! Fluency: perplexity of a continuation given its prompt under an evaluator LM that is not
//! the model being evaluated (EVALUATION.md). Prompt and continuation are tokenized
//! separately by the evaluator's tokenizer and concatenated, as DExperts does, so the
//! continuation's tokens are exactly those of its own text.

use crate::error::{Error, Result};
use crate::lm::{ids_tensor, CausalLm, TokenId};
use crate::text::Tokenizer;

/// Negative log-likelihood of one continuation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ContinuationNll {
    /// Sum of -log p over the continuation's tokens (nats).
    pub nll: f64,
    pub tokens: usize,
}

impl ContinuationNll {
    /// exp(mean NLL per token) of this continuation.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens as f64).exp()
    }
}

/// Scores `continuation` after `prompt` under `lm`. Empty continuations have no tokens and
/// yield `None`.
pub fn continuation_nll(
    lm: &dyn CausalLm,
    tok: &Tokenizer,
    prompt: &str,
    continuation: &str,
) -> Result<Option<ContinuationNll>> {
    Ok(continuation_nlls(lm, tok, prompt, &[continuation])?.remove(0))
}

/// Scores several continuations of one prompt: the prompt runs once, then all continuations
/// together as one batch, right-padded (causal attention keeps the padding, which comes after
/// every real position, from touching them). Empty continuations yield `None`.
pub fn continuation_nlls(
    lm: &dyn CausalLm,
    tok: &Tokenizer,
    prompt: &str,
    continuations: &[&str],
) -> Result<Vec<Option<ContinuationNll>>> {
    let mut prompt_ids: Vec<TokenId> = tok.encode(prompt, false)?;
    if prompt_ids.is_empty() {
        prompt_ids.extend(tok.bos);
    }
    if prompt_ids.is_empty() {
        return Err(Error::Input(
            "empty prompt and the evaluator has no BOS token".into(),
        ));
    }
    // the continuation's own tokens: no BOS, special-token text stays text
    let conts: Vec<Vec<TokenId>> = continuations
        .iter()
        .map(|c| {
            let mut v = Vec::new();
            tok.encode_into(c, false, &mut v).map(|_| v)
        })
        .collect::<Result<_>>()?;
    let rows: Vec<usize> = (0..conts.len()).filter(|&i| !conts[i].is_empty()).collect();
    let mut out = vec![None; conts.len()];
    if rows.is_empty() {
        return Ok(out);
    }
    let longest = rows.iter().map(|&i| conts[i].len()).max().unwrap_or(0);
    let ctx = lm.info().context_length;
    if prompt_ids.len() + longest > ctx {
        return Err(Error::ContextOverflow {
            tokens: prompt_ids.len() + longest,
            requested: 0,
            context: ctx,
        });
    }
    let mut cache = lm.new_cache();
    let hidden = lm.forward_hidden(&ids_tensor(&[prompt_ids.clone()])?, &mut cache)?;
    let last = hidden.narrow(1, prompt_ids.len() - 1, 1)?.squeeze(1)?;
    let first = logit_rows(lm, &last)?.remove(0);
    for &i in &rows {
        out[i] = Some(ContinuationNll {
            nll: token_nll(&first, conts[i][0]),
            tokens: conts[i].len(),
        });
    }
    if longest > 1 {
        // every continuation but its last token, padded to the same length
        let batch: Vec<Vec<TokenId>> = rows
            .iter()
            .map(|&i| {
                let mut v = conts[i][..conts[i].len() - 1].to_vec();
                v.resize(longest - 1, 0);
                v
            })
            .collect();
        cache.repeat_batch(rows.len())?;
        let hidden = lm.forward_hidden(&ids_tensor(&batch)?, &mut cache)?;
        for (r, &i) in rows.iter().enumerate() {
            let n = conts[i].len() - 1;
            if n == 0 {
                continue;
            }
            let h = hidden.get(r)?.narrow(0, 0, n)?;
            let extra: f64 = logit_rows(lm, &h)?
                .iter()
                .zip(&conts[i][1..])
                .map(|(row, &t)| token_nll(row, t))
                .sum();
            if let Some(c) = out[i].as_mut() {
                c.nll += extra;
            }
        }
    }
    Ok(out)
}

fn logit_rows(lm: &dyn CausalLm, hidden: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(lm
        .lm_head(hidden)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?)
}

/// `-log softmax(logits)[target]`, in f64.
pub fn token_nll(logits: &[f32], target: TokenId) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target as usize] as f64
}

/// The two perplexity summaries the report gives: the mean of per-continuation perplexities,
/// and exp of the mean NLL over all continuation tokens.
pub fn summarize(items: &[ContinuationNll]) -> (f64, f64) {
    if items.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean_ppl = items.iter().map(|c| c.perplexity()).sum::<f64>() / items.len() as f64;
    let (nll, toks) = items
        .iter()
        .fold((0.0, 0usize), |(a, t), c| (a + c.nll, t + c.tokens));
    (mean_ppl, (nll / toks as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_mean_ppl_and_pooled_ppl() {
        let a = ContinuationNll {
            nll: 2.0,
            tokens: 2,
        }; // ppl e^1
        let b = ContinuationNll {
            nll: 6.0,
            tokens: 2,
        }; // ppl e^3
        let (mean_ppl, pooled) = summarize(&[a, b]);
        assert!((mean_ppl - (1f64.exp() + 3f64.exp()) / 2.0).abs() < 1e-9);
        assert!((pooled - 2f64.exp()).abs() < 1e-9);
    }
}
