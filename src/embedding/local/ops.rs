//! The encoder's two fused CPU ops on packed sequences: self-attention and
//! "add, then layer norm".
//!
//! Sequences are packed, not padded: the rows of a (tokens, width) matrix
//! are the tokens of sequence 0, then of sequence 1, and so on, with
//! `lengths` saying where each ends. The dense layers treat every token
//! alike, so only attention needs to know the boundaries; nothing is
//! computed for padding, and no mask is needed.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, bail};
use rayon::prelude::*;

/// The contiguous `f32` data behind a layout.
fn data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what} must be contiguous");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `out = a + b`, element-wise.
#[inline(always)]
fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// The dot product, in 8 interleaved partial sums that the compiler keeps
/// in vector registers (a single running sum cannot be vectorised without
/// reordering the additions, which Rust does not do on its own).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (a, b) in a8.zip(b8) {
        for ((l, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *l += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Rows per task when an op runs on rayon's pool.
const ROWS_PER_TASK: usize = 32;

/// Calls `f(first_row, block)` on blocks of whole rows of `out` (rows of
/// `width`): in parallel on rayon's pool (the one candle's matmul uses) when
/// it has several threads and there are at least two blocks, else once on
/// the calling thread.
pub(super) fn for_row_blocks(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    if rows >= 2 * ROWS_PER_TASK && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(ROWS_PER_TASK * width).enumerate().for_each(|(i, block)| f(i * ROWS_PER_TASK, block));
    } else {
        f(0, out);
    }
}

/// Multi-head self-attention within each packed sequence.
///
/// Input: the query/key/value projections without their bias, (tokens, 3 *
/// hidden), query block first, each block split into `heads` heads of
/// `head_size`; the three biases side by side, (3 * hidden). The query
/// weights and bias already carry the 1/sqrt(head_size) scale. Output: the
/// heads' contexts side by side, (tokens, hidden). Sequences run in parallel
/// when rayon's pool has several threads.
pub struct Attention<'a> {
    pub lengths: &'a [usize],
    pub heads: usize,
    pub head_size: usize,
}

impl CustomOp2 for Attention<'_> {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (qkv, bias) = (data(qkv, qkv_l, "qkv")?, data(bias, bias_l, "qkv bias")?);
        let hidden = self.heads * self.head_size;
        let tokens: usize = self.lengths.iter().sum();
        if self.head_size == 0 || qkv_l.dims() != [tokens, 3 * hidden] || bias.len() != 3 * hidden {
            bail!(
                "attention: qkv {:?}, bias {:?}, {} tokens of width {}",
                qkv_l.dims(),
                bias_l.dims(),
                tokens,
                3 * hidden
            );
        }
        let mut out = vec![0f32; tokens * hidden];
        // Each sequence's input rows and output rows.
        let mut sequences = Vec::with_capacity(self.lengths.len());
        let (mut rest_in, mut rest_out) = (qkv, out.as_mut_slice());
        for &len in self.lengths {
            let (rows, more_in) = rest_in.split_at(len * 3 * hidden);
            let (out_rows, more_out) = rest_out.split_at_mut(len * hidden);
            sequences.push((rows, out_rows));
            (rest_in, rest_out) = (more_in, more_out);
        }
        let max_len = self.lengths.iter().copied().max().unwrap_or(0);
        let scratch = || Scratch::new(max_len, self.head_size);
        let run = |scratch: &mut Scratch, (rows, out_rows): (&[f32], &mut [f32])| {
            self.attend(rows, bias, out_rows, scratch);
        };
        if sequences.len() > 1 && tokens >= 2 * ROWS_PER_TASK && rayon::current_num_threads() > 1 {
            sequences.into_par_iter().for_each_init(scratch, run);
        } else {
            let mut scratch = scratch();
            sequences.into_iter().for_each(|sequence| run(&mut scratch, sequence));
        }
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }
}

/// Buffers for one head of one sequence.
struct Scratch {
    keys: Vec<f32>,
    values: Vec<f32>,
    query: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(max_len: usize, head_size: usize) -> Self {
        Self {
            keys: vec![0.0; max_len * head_size],
            values: vec![0.0; max_len * head_size],
            query: vec![0.0; head_size],
            scores: vec![0.0; max_len],
        }
    }
}

impl Attention<'_> {
    /// One sequence: `rows` (len, 3 * hidden) in, `out` (len, hidden) out.
    fn attend(&self, rows: &[f32], bias: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let (d, hidden) = (self.head_size, self.heads * self.head_size);
        let width = 3 * hidden;
        let len = rows.len() / width;
        let Scratch { keys, values, query, scores } = scratch;
        let scores = &mut scores[..len];
        for head in 0..self.heads {
            // The head's biased keys and values, (len, d) each; then each
            // query's scores, softmax and context.
            let (q_at, k_at, v_at) = (head * d, hidden + head * d, 2 * hidden + head * d);
            for ((row, key), value) in
                rows.chunks_exact(width).zip(keys.chunks_exact_mut(d)).zip(values.chunks_exact_mut(d))
            {
                add(&row[k_at..k_at + d], &bias[k_at..k_at + d], key);
                add(&row[v_at..v_at + d], &bias[v_at..v_at + d], value);
            }
            for (row, ctx) in rows.chunks_exact(width).zip(out.chunks_exact_mut(hidden)) {
                add(&row[q_at..q_at + d], &bias[q_at..q_at + d], query);
                for (s, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
                    *s = dot(query, key);
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let ctx = &mut ctx[head * d..(head + 1) * d];
                for (&p, value) in scores.iter().zip(values.chunks_exact(d)) {
                    for (c, v) in ctx.iter_mut().zip(value) {
                        *c += p * v;
                    }
                }
                let inv = 1.0 / sum;
                ctx.iter_mut().for_each(|c| *c *= inv);
            }
        }
    }
}

/// `layer_norm(x + bias + residual) * gamma + beta` per row: the end of each
/// BERT sub-layer (and of the embeddings, with a zero bias).
///
/// Inputs: `x` and `residual`, (rows, hidden); `params`, (3, hidden): bias,
/// gamma, beta. Mean and variance in two passes.
pub struct AddNorm {
    pub eps: f32,
}

impl CustomOp3 for AddNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        residual: &CpuStorage,
        residual_l: &Layout,
        params: &CpuStorage,
        params_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, residual, params) =
            (data(x, x_l, "x")?, data(residual, residual_l, "residual")?, data(params, params_l, "params")?);
        let width = params.len() / 3;
        if width == 0
            || params_l.dims() != [3, width]
            || x_l.dims() != residual_l.dims()
            || x_l.dims().last() != Some(&width)
        {
            bail!("add-norm: x {:?}, residual {:?}, params {:?}", x_l.dims(), residual_l.dims(), params_l.dims());
        }
        let (bias, rest) = params.split_at(width);
        let (gamma, beta) = rest.split_at(width);
        let mut out = vec![0f32; x.len()];
        for_row_blocks(&mut out, width, |first, block| {
            let at = first * width..first * width + block.len();
            let rows = block
                .chunks_exact_mut(width)
                .zip(x[at.clone()].chunks_exact(width))
                .zip(residual[at].chunks_exact(width));
            for ((out, x), residual) in rows {
                for (((o, x), r), b) in out.iter_mut().zip(x).zip(residual).zip(bias) {
                    *o = x + b + r;
                }
                let mean = out.iter().sum::<f32>() / width as f32;
                let var = out.iter().map(|o| (o - mean) * (o - mean)).sum::<f32>() / width as f32;
                let inv_std = 1.0 / (var + self.eps).sqrt();
                for ((o, g), b) in out.iter_mut().zip(gamma).zip(beta) {
                    *o = (*o - mean) * inv_std * g + b;
                }
            }
        });
        Ok((CpuStorage::F32(out), x_l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor};

    use super::*;

    /// The attention of one unpadded sequence with candle's ops.
    fn reference_attention(qkv: &Tensor, bias: &Tensor, heads: usize, d: usize) -> candle_core::Result<Tensor> {
        let len = qkv.dim(0)?;
        let qkv = qkv.broadcast_add(bias)?.reshape((len, 3, heads, d))?;
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1)?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let probs = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
        probs.matmul(&v)?.transpose(0, 1)?.contiguous()?.reshape((len, heads * d))
    }

    #[test]
    fn packed_attention_equals_per_sequence_attention() -> candle_core::Result<()> {
        let (heads, d) = (3, 4);
        let lengths = [5, 1, 7];
        let dev = Device::Cpu;
        let tokens = lengths.iter().sum::<usize>();
        let qkv = Tensor::randn(0f32, 1.0, (tokens, 3 * heads * d), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 3 * heads * d, &dev)?;
        let got = qkv.apply_op2_no_bwd(&bias, &Attention { lengths: &lengths, heads, head_size: d })?;
        let mut start = 0;
        for len in lengths {
            let want = reference_attention(&qkv.narrow(0, start, len)?, &bias, heads, d)?;
            let diff = (got.narrow(0, start, len)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "sequence at {start}: max |diff| {diff}");
            start += len;
        }
        // The lengths must cover the rows.
        assert!(qkv.apply_op2_no_bwd(&bias, &Attention { lengths: &[5, 1], heads, head_size: d }).is_err());
        Ok(())
    }

    /// `f` on a rayon pool of `threads` threads.
    fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool").install(f)
    }

    #[test]
    fn parallel_ops_equal_serial_ops() -> candle_core::Result<()> {
        let (heads, d) = (4, 8);
        let lengths: Vec<usize> = (0..20).map(|i| 1 + i % 9).collect();
        let tokens = lengths.iter().sum::<usize>();
        assert!(tokens >= 2 * ROWS_PER_TASK, "enough rows to run in parallel");
        let dev = Device::Cpu;
        let qkv = Tensor::randn(0f32, 1.0, (tokens, 3 * heads * d), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 3 * heads * d, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (tokens, heads * d), &dev)?;
        let params = Tensor::randn(0f32, 1.0, (3, heads * d), &dev)?;
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let context = qkv.apply_op2_no_bwd(&bias, &Attention { lengths: &lengths, heads, head_size: d })?;
            let normed = context.apply_op3_no_bwd(&x, &params, &AddNorm { eps: 1e-12 })?;
            let activated = normed.apply_op2_no_bwd(&params.get(0)?, &super::super::gelu::BiasGelu)?;
            [context, normed, activated].iter().map(|t| t.flatten_all()?.to_vec1()).collect()
        };
        assert_eq!(on_threads(1, run)?, on_threads(3, run)?);
        Ok(())
    }

    #[test]
    fn add_norm_equals_candle_layer_norm() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (6, 16), &dev)? + 5.0)?;
        let residual = Tensor::randn(0f32, 1.0, (6, 16), &dev)?;
        let params = Tensor::randn(0f32, 1.0, (3, 16), &dev)?;
        let got = x.apply_op3_no_bwd(&residual, &params, &AddNorm { eps: 1e-12 })?;
        let summed = (x.broadcast_add(&params.get(0)?)? + &residual)?;
        let want = candle_nn::ops::layer_norm_slow(&summed, &params.get(1)?, &params.get(2)?, 1e-12)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max |diff| {diff}");
        Ok(())
    }
}
