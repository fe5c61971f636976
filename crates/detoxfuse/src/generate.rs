//! Decoding loops: a prompt in, `n` continuations out, with stop tokens/strings and a length
//! limit. The model side is a [`Decoder`] so that the plain target and the fused
//! target+calibration pair run through the same loop.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::lm::{ids_tensor, CausalLm, KvCache, TokenId};
use crate::sample::{sample_rows, Sampler, SamplingParams};
use crate::text::Tokenizer;

/// Something that turns token ids into next-token logits, keeping its own state.
pub trait Decoder {
    /// Longest sequence it accepts.
    fn context_length(&self) -> usize;
    /// Clears state and runs the prompt (batch 1); returns the last position's logits `(vocab)`.
    fn prefill(&mut self, prompt: &[TokenId]) -> Result<Vec<f32>>;
    /// Makes `n` copies of the current batch-1 state.
    fn fork(&mut self, n: usize) -> Result<()>;
    /// Keeps only these rows of the batch.
    fn retain_rows(&mut self, rows: &[usize]) -> Result<()>;
    /// Feeds one token per row; returns logits per row.
    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>>;
}

/// The untouched model: hidden state straight into its own LM head.
pub struct PlainDecoder<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
}

impl<'m> PlainDecoder<'m> {
    pub fn new(model: &'m dyn CausalLm) -> Self {
        Self {
            cache: model.new_cache(),
            model,
        }
    }
}

pub(crate) fn rows_of(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

impl Decoder for PlainDecoder<'_> {
    fn context_length(&self) -> usize {
        self.model.info().context_length
    }

    fn prefill(&mut self, prompt: &[TokenId]) -> Result<Vec<f32>> {
        self.cache = self.model.new_cache();
        let logits = self
            .model
            .forward_last_logits(&ids_tensor(&[prompt.to_vec()])?, &mut self.cache)?;
        Ok(rows_of(&logits)?.remove(0))
    }

    fn fork(&mut self, n: usize) -> Result<()> {
        self.cache.repeat_batch(n)
    }

    fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.cache.select_rows(rows)
    }

    fn step(&mut self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<TokenId>> = tokens.iter().map(|&t| vec![t]).collect();
        let logits = self
            .model
            .forward_last_logits(&ids_tensor(&ids)?, &mut self.cache)?;
        rows_of(&logits)
    }
}

/// What to generate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub max_tokens: usize,
    /// Continuations per prompt, decoded together as one batch.
    pub n: usize,
    pub sampling: SamplingParams,
    /// Generation stops (and the text is cut) where one of these strings appears.
    pub stop: Vec<String>,
    /// Token ids that end a continuation (besides the tokenizer's EOS / end of turn).
    pub stop_tokens: Vec<TokenId>,
}

/// What to generate as a user gives it (`detoxfuse generate`'s flags under the `clap`
/// feature, defaulting to [`GenerationConfig::default`]); [`GenerationOptions::config`]
/// checks it.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct GenerationOptions {
    #[cfg_attr(feature = "clap", arg(long, default_value_t = GenerationConfig::default().max_tokens))]
    pub max_tokens: usize,
    /// Continuations per prompt (decoded together as one batch).
    #[cfg_attr(feature = "clap", arg(long, short = 'n', default_value_t = GenerationConfig::default().n))]
    pub samples: usize,
    /// 0 = greedy.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SamplingParams::default().temperature))]
    pub temperature: f32,
    /// 0 = off.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SamplingParams::default().top_k))]
    pub top_k: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SamplingParams::default().top_p))]
    pub top_p: f32,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = SamplingParams::default().seed))]
    pub seed: u64,
    /// Stop when this string is generated (repeatable); it is not included in the text.
    #[cfg_attr(feature = "clap", arg(long))]
    pub stop: Vec<String>,
}

impl GenerationOptions {
    /// The generation these options ask for, or why the sampling parameters are invalid.
    pub fn config(&self) -> Result<GenerationConfig> {
        let cfg = GenerationConfig {
            max_tokens: self.max_tokens,
            n: self.samples,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_tokens: vec![],
        };
        cfg.sampling.validate()?;
        Ok(cfg)
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            n: 1,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

/// One continuation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<TokenId>,
    pub finish_reason: FinishReason,
}

/// Generates `cfg.n` continuations of `prompt` (already tokenized).
pub fn generate(
    decoder: &mut dyn Decoder,
    tok: &Tokenizer,
    prompt: &[TokenId],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    generate_streaming(decoder, tok, prompt, cfg, &mut |_, _| true)
}

/// How much of `bytes` can be shown now: complete UTF-8 characters only, holding back a tail
/// that could still grow into one of the `stops` (it must never be shown if it does).
fn releasable(bytes: &[u8], stops: &[String]) -> usize {
    let valid = match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) => e.valid_up_to(),
    };
    let hold = stops
        .iter()
        .filter_map(|st| {
            (1..st.len())
                .rev()
                .find(|&k| k <= valid && bytes[..valid].ends_with(&st.as_bytes()[..k]))
        })
        .max()
        .unwrap_or(0);
    valid - hold
}

/// [`generate`], calling `on_text(sample, delta)` whenever a sample's text grows by text
/// that is final (whole characters, never part of a stop string). The deltas of a sample
/// concatenate to its final text. Returning `false` cancels the whole generation (e.g. the
/// client went away); what was generated so far is returned.
pub fn generate_streaming(
    decoder: &mut dyn Decoder,
    tok: &Tokenizer,
    prompt: &[TokenId],
    cfg: &GenerationConfig,
    on_text: &mut dyn FnMut(usize, &str) -> bool,
) -> Result<Vec<Generation>> {
    cfg.sampling.validate()?;
    if cfg.n == 0 {
        return Err(Error::Input("n must be at least 1".into()));
    }
    let prompt: Vec<TokenId> = if prompt.is_empty() {
        tok.bos.map(|b| vec![b]).ok_or_else(|| {
            Error::Input("the prompt is empty and the model has no BOS token to start from".into())
        })?
    } else {
        prompt.to_vec()
    };
    let ctx = decoder.context_length();
    if prompt.len() + cfg.max_tokens > ctx {
        return Err(Error::ContextOverflow {
            tokens: prompt.len(),
            requested: cfg.max_tokens,
            context: ctx,
        });
    }
    let mut stop_ids = tok.stop_tokens();
    stop_ids.extend(&cfg.stop_tokens);

    let first = decoder.prefill(&prompt)?;
    let n = cfg.n;
    let mut samplers: Vec<Sampler> = (0..n)
        .map(|i| Sampler::new(&cfg.sampling, i as u64))
        .collect();
    let mut out: Vec<Generation> = (0..n)
        .map(|_| Generation {
            text: String::new(),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut bytes: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut shown = vec![0usize; n];
    if cfg.max_tokens == 0 {
        return Ok(out);
    }
    if n > 1 {
        decoder.fork(n)?;
    }
    // `active[r]` is the sample that batch row r belongs to.
    let mut active: Vec<usize> = (0..n).collect();
    let mut logits: Vec<Vec<f32>> = vec![first; n];
    let mut cancelled = false;
    for step in 0..cfg.max_tokens {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        let drawn = {
            let mut rows: Vec<&mut Sampler> = samplers
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, s)| s)
                .collect();
            sample_rows(&mut rows, &logits)
        };
        for ((row, &s), &t) in active.iter().enumerate().zip(&drawn) {
            let g = &mut out[s];
            if stop_ids.contains(&t) {
                g.finish_reason = FinishReason::Stop;
                continue;
            }
            g.token_ids.push(t);
            bytes[s].extend(tok.token_bytes(t, false));
            if !cfg.stop.is_empty() {
                let text = String::from_utf8_lossy(&bytes[s]);
                if let Some(cut) = cfg
                    .stop
                    .iter()
                    .filter_map(|st| text.find(st.as_str()))
                    .min()
                {
                    bytes[s].truncate(cut);
                    g.finish_reason = FinishReason::Stop;
                    continue;
                }
            }
            next.push(t);
            keep.push(row);
            let upto = releasable(&bytes[s], &cfg.stop);
            if upto > shown[s] {
                let delta = std::str::from_utf8(&bytes[s][shown[s]..upto]).unwrap_or_default();
                shown[s] = upto;
                if !on_text(s, delta) {
                    cancelled = true;
                }
            }
        }
        if next.is_empty() || step + 1 == cfg.max_tokens || cancelled {
            break;
        }
        if keep.len() < active.len() {
            decoder.retain_rows(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        logits = decoder.step(&next)?;
    }
    for (s, (g, b)) in out.iter_mut().zip(bytes).enumerate() {
        g.text = String::from_utf8_lossy(&b).into_owned();
        // the rest: a held-back tail that did not become a stop string, or a torn character
        let rest = String::from_utf8_lossy(&b[shown[s].min(b.len())..]).into_owned();
        if !cancelled && !rest.is_empty() {
            on_text(s, &rest);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::releasable;

    #[test]
    fn releasable_holds_back_torn_characters_and_stop_prefixes() {
        assert_eq!(releasable(b"hello", &[]), 5);
        // "é" is C3 A9: a lone C3 waits
        assert_eq!(releasable(b"caf\xc3", &[]), 3);
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(releasable(b"ok\nUs", &stops), 2);
        assert_eq!(releasable(b"ok\nUx", &stops), 5);
        assert_eq!(releasable(b"ok\n", &stops), 2);
    }
}
