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

/// The prompt a decoder reads: `prompt`, or the BOS token when it is empty; refused when it
/// and `max_tokens` do not fit in `context`.
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &[TokenId],
    max_tokens: usize,
    context: usize,
) -> Result<Vec<TokenId>> {
    let prompt: Vec<TokenId> = if prompt.is_empty() {
        tok.bos.map(|b| vec![b]).ok_or_else(|| {
            Error::Input("the prompt is empty and the model has no BOS token to start from".into())
        })?
    } else {
        prompt.to_vec()
    };
    if prompt.len() + max_tokens > context {
        return Err(Error::ContextOverflow {
            tokens: prompt.len(),
            requested: max_tokens,
            context,
        });
    }
    Ok(prompt)
}

/// One request's samples while they decode: each sample's sampler, text so far, stop rules
/// and the part of its text already shown. [`generate_streaming`] drives one of these; the
/// serving scheduler drives many, whose rows share one batch.
pub struct Samples {
    stop_ids: Vec<TokenId>,
    stop: Vec<String>,
    max_tokens: usize,
    samplers: Vec<Sampler>,
    out: Vec<Generation>,
    bytes: Vec<Vec<u8>>,
    shown: Vec<usize>,
    /// The sample each running row belongs to, in row order.
    running: Vec<usize>,
    drawn: usize,
    cancelled: bool,
}

impl Samples {
    pub fn new(tok: &Tokenizer, cfg: &GenerationConfig) -> Self {
        let n = cfg.n;
        let mut stop_ids = tok.stop_tokens();
        stop_ids.extend(&cfg.stop_tokens);
        Self {
            stop_ids,
            stop: cfg.stop.clone(),
            max_tokens: cfg.max_tokens,
            samplers: (0..n)
                .map(|i| Sampler::new(&cfg.sampling, i as u64))
                .collect(),
            out: (0..n)
                .map(|_| Generation {
                    text: String::new(),
                    token_ids: Vec::new(),
                    finish_reason: FinishReason::Length,
                })
                .collect(),
            bytes: vec![Vec::new(); n],
            shown: vec![0; n],
            running: if cfg.max_tokens == 0 {
                Vec::new()
            } else {
                (0..n).collect()
            },
            drawn: 0,
            cancelled: false,
        }
    }

    /// Rows still decoding.
    pub fn rows(&self) -> usize {
        self.running.len()
    }

    pub fn is_done(&self) -> bool {
        self.running.is_empty()
    }

    /// The samplers of the running rows, in row order.
    pub fn samplers(&mut self) -> Vec<&mut Sampler> {
        let running = &self.running;
        self.samplers
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| running.contains(i))
            .map(|(_, s)| s)
            .collect()
    }

    /// Draws each running row's next token from its logits, then [`Samples::take`]s them.
    pub fn draw(
        &mut self,
        tok: &Tokenizer,
        logits: &[Vec<f32>],
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> (Vec<usize>, Vec<TokenId>) {
        let drawn = sample_rows(&mut self.samplers(), logits);
        self.take(tok, &drawn, on_text)
    }

    /// Takes the tokens drawn for the running rows (stop tokens and strings end a sample,
    /// final text goes to `on_text(sample, delta)`, whose `false` cancels the request).
    /// Returns which of the running rows go on (indices among them) and the token each is
    /// fed next; none once the request is done.
    pub fn take(
        &mut self,
        tok: &Tokenizer,
        drawn: &[TokenId],
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> (Vec<usize>, Vec<TokenId>) {
        let mut next = Vec::with_capacity(self.running.len());
        let mut keep = Vec::with_capacity(self.running.len());
        for ((row, &s), &t) in self.running.iter().enumerate().zip(drawn) {
            let g = &mut self.out[s];
            if self.stop_ids.contains(&t) {
                g.finish_reason = FinishReason::Stop;
                continue;
            }
            g.token_ids.push(t);
            let bytes = &mut self.bytes[s];
            bytes.extend(tok.token_bytes(t, false));
            if !self.stop.is_empty() {
                let text = String::from_utf8_lossy(bytes);
                if let Some(cut) = self
                    .stop
                    .iter()
                    .filter_map(|st| text.find(st.as_str()))
                    .min()
                {
                    bytes.truncate(cut);
                    g.finish_reason = FinishReason::Stop;
                    continue;
                }
            }
            next.push(t);
            keep.push(row);
            let upto = releasable(bytes, &self.stop);
            if upto > self.shown[s] {
                let delta = std::str::from_utf8(&bytes[self.shown[s]..upto]).unwrap_or_default();
                self.shown[s] = upto;
                if !on_text(s, delta) {
                    self.cancelled = true;
                }
            }
        }
        self.drawn += 1;
        if self.cancelled || self.drawn >= self.max_tokens {
            keep.clear();
            next.clear();
        }
        self.running = keep.iter().map(|&r| self.running[r]).collect();
        (keep, next)
    }

    /// Stops every row now (the client left, or its time is up); what was generated stands.
    pub fn cancel(&mut self) {
        self.cancelled = true;
        self.running.clear();
    }

    /// The continuations. Unless cancelled, the text still held back (a tail that did not
    /// become a stop string, or a torn character) goes to `on_text` first.
    pub fn finish(self, on_text: &mut dyn FnMut(usize, &str) -> bool) -> Vec<Generation> {
        let mut out = self.out;
        for (s, (g, b)) in out.iter_mut().zip(self.bytes).enumerate() {
            g.text = String::from_utf8_lossy(&b).into_owned();
            let rest = String::from_utf8_lossy(&b[self.shown[s].min(b.len())..]).into_owned();
            if !self.cancelled && !rest.is_empty() {
                on_text(s, &rest);
            }
        }
        out
    }
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
    let prompt = prompt_ids(tok, prompt, cfg.max_tokens, decoder.context_length())?;
    let first = decoder.prefill(&prompt)?;
    let mut samples = Samples::new(tok, cfg);
    if !samples.is_done() {
        if cfg.n > 1 {
            decoder.fork(cfg.n)?;
        }
        let mut logits: Vec<Vec<f32>> = vec![first; cfg.n];
        loop {
            let rows = samples.rows();
            let (keep, next) = samples.draw(tok, &logits, on_text);
            if keep.is_empty() {
                break;
            }
            if keep.len() < rows {
                decoder.retain_rows(&keep)?;
            }
            logits = decoder.step(&next)?;
        }
    }
    Ok(samples.finish(on_text))
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
