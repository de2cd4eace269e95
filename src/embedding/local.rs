//! The `local` provider: sentence-transformers all-MiniLM-L6-v2 run
//! in-process on the CPU (candle for the tensors, tokenizers for WordPiece).
//!
//! What `SentenceTransformer.encode` does, reproduced: each text is
//! stripped, tokenised by the model's `tokenizer.json` (lower case, accents
//! stripped, `[CLS]`/`[SEP]`) and truncated to `max_tokens` tokens including
//! the special ones (sentence-transformers' `max_seq_length`, 256 for this
//! model; the 128 inside `tokenizer.json` is not what the model was used
//! with); the BERT encoder runs in `f32`; the last hidden state is averaged
//! over the real tokens (mean pooling over the attention mask) and
//! L2-normalised. `tests/api/model.rs` holds the result to reference vectors
//! from an independent implementation.
//!
//! Speed on a CPU (`benches/embed.rs` measures this model's texts/s):
//! - The encoder is written here ([`bert`]) rather than taken from
//!   candle-transformers' `BertModel`, for the two points below: packed
//!   sequences and the fused ops, which `BertModel` (padded batches,
//!   candle's element-wise ops) cannot do. candle-transformers is not a
//!   dependency, so no benchmark here runs the two side by side and no
//!   speed-up figure is claimed.
//! - No padding: the tokens of all texts of a call are packed into one
//!   matrix, so each dense layer (97% of the arithmetic) is one matmul over
//!   exactly the real tokens, and attention runs per text ([`ops`]): padded
//!   batches spend work on padding tokens, even sorted by length within a
//!   call.
//! - The exact GELU evaluates a vectorised erf ([`gelu`]) instead of
//!   candle's scalar erf. The tanh approximation and half
//!   precision are not used: they change the vectors, and half precision is
//!   slower on these CPUs anyway.
//! - Threads: candle's matmul and the fused ops run on rayon's global pool,
//!   sized by `RAYON_NUM_THREADS` (default: one per CPU); with one thread
//!   everything runs on the calling thread. No candle element-wise op runs
//!   in the forward pass, so candle's own element-wise pool (and
//!   `CANDLE_BARRIER_POOL_SPIN_LIMIT`) plays no part.
//!
//! [`LocalModel`] is `Send + Sync` and immutable after [`LocalModel::load`]:
//! several inference threads share one behind an `Arc`.

mod bert;
mod gelu;
mod ops;

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

use self::bert::{Bert, Config, ConfigError};
use super::{Embed, EmbedError, Embeddings};
use crate::domain::vector;

const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Tokens per forward pass at most: bounds the activations (about 15 KiB a
/// token at the peak, so about 30 MiB) when a call brings many long texts.
const MAX_BATCH_TOKENS: usize = 2048;

/// Why the model did not load: each file error names its file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Config { path: PathBuf, source: serde_json::Error },
    #[error("{}: {source}", path.display())]
    Unsupported { path: PathBuf, source: ConfigError },
    #[error("{}: {source}", path.display())]
    Tokenizer { path: PathBuf, source: tokenizers::Error },
    #[error("{}: {source}", path.display())]
    Weights { path: PathBuf, source: candle_core::Error },
    #[error("max_tokens {max_tokens} is outside 3..={positions} (the model's positions)")]
    MaxTokens { max_tokens: usize, positions: usize },
}

pub struct LocalModel {
    tokenizer: Tokenizer,
    bert: Bert,
}

impl LocalModel {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `dir` (the sentence-transformers model folder) onto the CPU in `f32`,
    /// truncating texts at `max_tokens` tokens (special tokens included).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, EmbedError> {
        let path = dir.join("config.json");
        let raw = std::fs::read(&path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
        let config: Config =
            serde_json::from_slice(&raw).map_err(|source| LoadError::Config { path: path.clone(), source })?;
        config.check().map_err(|source| LoadError::Unsupported { path, source })?;
        if !(3..=config.max_position_embeddings).contains(&max_tokens) {
            return Err(LoadError::MaxTokens { max_tokens, positions: config.max_position_embeddings }.into());
        }

        let path = dir.join("tokenizer.json");
        let tokenizer_err = |source| LoadError::Tokenizer { path: path.clone(), source };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(tokenizer_err)?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..TruncationParams::default() }))
            .map_err(tokenizer_err)?;
        // Sequences are packed, never padded (see `bert`).
        tokenizer.with_padding(None);

        let path = dir.join("model.safetensors");
        let weights_err = |source| LoadError::Weights { path: path.clone(), source };
        let weights = candle_core::safetensors::load(&path, &Device::Cpu).map_err(weights_err)?;
        let vb = VarBuilder::from_tensors(weights, candle_core::DType::F32, &Device::Cpu);
        let bert = Bert::load(&vb, &config).map_err(weights_err)?;
        Ok(Self { tokenizer, bert })
    }

    /// The embedding dimension (the model's hidden size, 384).
    pub fn dimensions(&self) -> usize {
        self.bert.hidden_size()
    }

    /// The token ids the model sees for `text`: stripped, with `[CLS]` and
    /// `[SEP]`, truncated.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let encoding = self.tokenizer.encode_fast(text.trim(), true).map_err(EmbedError::Tokenize)?;
        let ids = encoding.get_ids();
        if ids.is_empty() || ids.len() > self.bert.max_positions() {
            return Err(EmbedError::TokenCount { tokens: ids.len(), bytes: text.len() });
        }
        Ok(ids.to_vec())
    }
}

impl Embed for LocalModel {
    fn model(&self) -> &str {
        MODEL_NAME
    }

    /// `tokens` counts every token the model saw, special tokens included.
    fn embed(&self, texts: &[&str]) -> Result<Embeddings, EmbedError> {
        let ids = texts.iter().map(|t| self.token_ids(t)).collect::<Result<Vec<_>, _>>()?;
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let width = self.dimensions();
        let mut vectors = Vec::with_capacity(texts.len());
        for run in runs(&lengths, MAX_BATCH_TOKENS) {
            let packed = ids[run.clone()].concat();
            let hidden = self.bert.forward(&packed, &lengths[run.clone()]).map_err(EmbedError::Inference)?;
            vectors.extend(mean_pool(&hidden, &lengths[run], width));
        }
        Ok(Embeddings { vectors, tokens: lengths.iter().map(|&l| l as u64).sum() })
    }
}

/// Cuts sequences into consecutive runs of at most `max_tokens` tokens (a
/// longer sequence gets a run of its own).
fn runs(lengths: &[usize], max_tokens: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &len) in lengths.iter().enumerate() {
        if i > start && tokens + len > max_tokens {
            runs.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += len;
    }
    if start < lengths.len() {
        runs.push(start..lengths.len());
    }
    runs
}

/// Averages each sequence's rows of `hidden` (the packed sequences of
/// `lengths`, rows of `width`) and L2-normalises the average.
fn mean_pool(hidden: &[f32], lengths: &[usize], width: usize) -> Vec<Vec<f32>> {
    let mut rows = hidden.chunks_exact(width);
    lengths
        .iter()
        .map(|&n| {
            let mut sum = vec![0f32; width];
            for row in rows.by_ref().take(n) {
                sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            sum.iter_mut().for_each(|s| *s /= n as f32);
            vector::normalise(&mut sum);
            sum
        })
        .collect()
}

/// Inference threads share one model.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<LocalModel>()
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_respect_the_token_budget() {
        assert!(runs(&[], 100).is_empty());
        assert_eq!(runs(&[30, 30, 30, 10, 50], 100), vec![0..4, 4..5]);
        assert_eq!(runs(&[60, 50, 40], 100), vec![0..1, 1..3]);
        // A sequence over the budget still runs, alone.
        assert_eq!(runs(&[5, 200, 5], 100), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn mean_pooling_averages_each_sequence_and_normalises() {
        // Width 2: a sequence of 2 rows, then one of 1 row.
        let hidden = [1.0, 2.0, 3.0, 4.0, 0.0, -5.0];
        let pooled = mean_pool(&hidden, &[2, 1], 2);
        let norm = (2f32 * 2.0 + 3.0 * 3.0).sqrt();
        assert!((pooled[0][0] - 2.0 / norm).abs() < 1e-6 && (pooled[0][1] - 3.0 / norm).abs() < 1e-6, "{pooled:?}");
        assert_eq!(pooled[1], vec![0.0, -1.0]);
    }
}
