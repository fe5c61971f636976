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
    let mut ids: Vec<TokenId> = tok.encode(prompt, false)?;
    if ids.is_empty() {
        ids.extend(tok.bos);
    }
    if ids.is_empty() {
        return Err(Error::Input(
            "empty prompt and the evaluator has no BOS token".into(),
        ));
    }
    let start = ids.len();
    tok.encode_into(continuation, false, &mut ids)?;
    let n = ids.len() - start;
    if n == 0 {
        return Ok(None);
    }
    let ctx = lm.info().context_length;
    if ids.len() > ctx {
        return Err(Error::ContextOverflow {
            tokens: ids.len(),
            requested: 0,
            context: ctx,
        });
    }
    let hidden = lm.forward_hidden(&ids_tensor(&[ids.clone()])?, &mut lm.new_cache())?;
    // positions start-1 .. end-2 predict the continuation's tokens
    let h = hidden.squeeze(0)?.narrow(0, start - 1, n)?;
    let logits = lm
        .lm_head(&h)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let nll = logits
        .iter()
        .zip(&ids[start..])
        .map(|(row, &t)| token_nll(row, t))
        .sum();
    Ok(Some(ContinuationNll { nll, tokens: n }))
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
