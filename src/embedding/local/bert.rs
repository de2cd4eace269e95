//! The BERT encoder of all-MiniLM-L6-v2 (embeddings and encoder layers, no
//! pooler) on packed sequences, with candle's matmul and three fused ops.
//!
//! Same arithmetic as Hugging Face's `BertModel` in `f32`, arranged for a
//! CPU:
//! - The tokens of all sequences are the rows of one matrix, without
//!   padding ([`super::ops`]): the dense layers, 97% of the work, run as one
//!   matmul per layer over exactly the real tokens.
//! - Per layer: four matmuls (query/key/value as one, against their
//!   concatenated weights; attention output; intermediate; output) and three
//!   single-pass ops: attention with its biases, bias + exact GELU
//!   ([`super::gelu`]), and bias + residual + layer norm (twice).
//! - Loading folds the 1/sqrt(head size) attention scale into the query
//!   weights, adds the token-type-0 embedding (every token's) to the
//!   position embeddings, and stores weights transposed for the matmul.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::gelu::BiasGelu;
use super::ops::{AddNorm, Attention};

type Result<T> = candle_core::Result<T>;

/// The fields of the model's `config.json` the forward pass depends on.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".into()
}

/// A `config.json` this forward pass does not implement.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("hidden_act {0:?}: only \"gelu\" (exact erf) is implemented")]
    Activation(String),
    #[error("position_embedding_type {0:?} is not implemented")]
    PositionEmbedding(String),
    #[error("hidden_size {hidden} is not a multiple of {heads} heads")]
    Heads { hidden: usize, heads: usize },
    #[error("type_vocab_size is 0")]
    NoTokenTypes,
}

impl Config {
    /// Refuses what this forward pass does not implement.
    pub fn check(&self) -> std::result::Result<(), ConfigError> {
        if self.hidden_act != "gelu" {
            return Err(ConfigError::Activation(self.hidden_act.clone()));
        }
        if self.position_embedding_type != "absolute" {
            return Err(ConfigError::PositionEmbedding(self.position_embedding_type.clone()));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::Heads { hidden: self.hidden_size, heads: self.num_attention_heads });
        }
        if self.type_vocab_size == 0 {
            return Err(ConfigError::NoTokenTypes);
        }
        Ok(())
    }
}

/// A dense layer's weight, stored transposed (inputs, outputs) so that the
/// matmul reads it row-major, and its bias (applied by the fused op after).
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn load(vb: &VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        Self::new(&vb.get((outputs, inputs), "weight")?, vb.get(outputs, "bias")?)
    }

    /// From PyTorch's (outputs, inputs) layout.
    fn new(weight: &Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self { weight_t: weight.t()?.contiguous()?, bias })
    }

    /// `x @ weight.T`, without the bias.
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight_t)
    }
}

/// A layer norm's parameters behind a bias: rows bias, gamma, beta.
fn norm_params(vb: &VarBuilder, bias: &Tensor, size: usize) -> Result<Tensor> {
    Tensor::stack(&[bias, &vb.get(size, "weight")?, &vb.get(size, "bias")?], 0)
}

struct Layer {
    /// Query (pre-scaled), key and value projections side by side.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Tensor,
    intermediate: Dense,
    output: Dense,
    output_norm: Tensor,
}

impl Layer {
    fn load(vb: &VarBuilder, config: &Config) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let scale = 1.0 / ((h / config.num_attention_heads) as f64).sqrt();
        let attention = vb.pp("attention.self");
        let part = |name: &str, scale: f64| -> Result<(Tensor, Tensor)> {
            let vb = attention.pp(name);
            Ok(((vb.get((h, h), "weight")? * scale)?, (vb.get(h, "bias")? * scale)?))
        };
        let (q_w, q_b) = part("query", scale)?;
        let (k_w, k_b) = part("key", 1.0)?;
        let (v_w, v_b) = part("value", 1.0)?;
        let qkv = Dense::new(&Tensor::cat(&[&q_w, &k_w, &v_w], 0)?, Tensor::cat(&[&q_b, &k_b, &v_b], 0)?)?;
        let attention_out = Dense::load(&vb.pp("attention.output.dense"), h, h)?;
        let attention_norm = norm_params(&vb.pp("attention.output.LayerNorm"), &attention_out.bias, h)?;
        let output = Dense::load(&vb.pp("output.dense"), i, h)?;
        let output_norm = norm_params(&vb.pp("output.LayerNorm"), &output.bias, h)?;
        Ok(Self {
            qkv,
            attention_out,
            attention_norm,
            intermediate: Dense::load(&vb.pp("intermediate.dense"), h, i)?,
            output,
            output_norm,
        })
    }

    /// `x`: (tokens, hidden), the packed sequences.
    fn forward(&self, x: &Tensor, attention: &Attention, norm: &AddNorm) -> Result<Tensor> {
        let context = self.qkv.matmul(x)?.apply_op2_no_bwd(&self.qkv.bias, attention)?;
        let x = self.attention_out.matmul(&context)?.apply_op3_no_bwd(x, &self.attention_norm, norm)?;
        let inner = self.intermediate.matmul(&x)?.apply_op2_no_bwd(&self.intermediate.bias, &BiasGelu)?;
        self.output.matmul(&inner)?.apply_op3_no_bwd(&x, &self.output_norm, norm)
    }
}

pub struct Bert {
    word_embeddings: Tensor,
    /// Position embeddings plus the token-type-0 embedding, (max positions, hidden).
    position_embeddings: Tensor,
    embedding_norm: Tensor,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    max_positions: usize,
    eps: f32,
}

impl Bert {
    pub fn load(vb: &VarBuilder, config: &Config) -> Result<Self> {
        let h = config.hidden_size;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb.clone() };
        let e = vb.pp("embeddings");
        let word_embeddings = e.get((config.vocab_size, h), "word_embeddings.weight")?;
        let positions = e.get((config.max_position_embeddings, h), "position_embeddings.weight")?;
        let token_type = e.get((config.type_vocab_size, h), "token_type_embeddings.weight")?;
        let position_embeddings = positions.broadcast_add(&token_type.get(0)?)?;
        let embedding_norm =
            norm_params(&e.pp("LayerNorm"), &Tensor::zeros(h, candle_core::DType::F32, vb.device())?, h)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(&vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embedding_norm,
            layers,
            heads: config.num_attention_heads,
            hidden: h,
            max_positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The last hidden state of packed sequences, (tokens, hidden)
    /// row-major: `ids` holds the token ids of each sequence in turn,
    /// `lengths` their counts (each at least 1, at most the model's
    /// positions).
    pub fn forward(&self, ids: &[u32], lengths: &[usize]) -> Result<Vec<f32>> {
        if lengths.iter().any(|&l| l == 0 || l > self.max_positions) || lengths.iter().sum::<usize>() != ids.len() {
            candle_core::bail!("bad packing: {} ids, lengths {lengths:?}", ids.len());
        }
        let device = Device::Cpu;
        let positions: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let words = self.word_embeddings.index_select(&Tensor::from_slice(ids, ids.len(), &device)?, 0)?;
        let positions =
            self.position_embeddings.index_select(&Tensor::from_slice(&positions, positions.len(), &device)?, 0)?;
        let norm = AddNorm { eps: self.eps };
        let mut x = words.apply_op3_no_bwd(&positions, &self.embedding_norm, &norm)?;
        let attention = Attention { lengths, heads: self.heads, head_size: self.hidden / self.heads };
        for layer in &self.layers {
            x = layer.forward(&x, &attention, &norm)?;
        }
        x.flatten_all()?.to_vec1()
    }
}
