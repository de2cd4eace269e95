//! The `hash` provider: character n-gram feature hashing.
//!
//! Each text is normalised (lower case, collapsed whitespace), padded with a
//! space on each side, cut into character 2-, 3- and 4-grams, and every
//! n-gram adds +1 or -1 (by a hash bit) to one of D dimensions (by the
//! rest of the hash); the result is L2-normalised. Deterministic across
//! runs, machines and versions (FNV-1a is fixed), microseconds per text, and
//! texts sharing many n-grams get high cosine similarity: enough to exercise
//! the pipeline end to end without a model.

use crate::domain::{text::normalise, vector};

use super::{Embed, EmbedError, Embeddings};

pub struct HashEmbedder {
    dimensions: usize,
}

impl HashEmbedder {
    pub fn new(dimensions: usize) -> Self {
        Self { dimensions }
    }

    /// Embeds one text.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0.0f32; self.dimensions];
        let chars: Vec<char> =
            std::iter::once(' ').chain(normalise(text).chars()).chain(std::iter::once(' ')).collect();
        for n in 2..=4 {
            for gram in chars.windows(n) {
                let h = fnv1a(gram, n as u64);
                let slot = (h >> 1) as usize % self.dimensions;
                v[slot] += if h & 1 == 0 { 1.0 } else { -1.0 };
            }
        }
        vector::normalise(&mut v);
        v
    }
}

impl Embed for HashEmbedder {
    fn model(&self) -> &str {
        "hash-ngram-v1"
    }

    /// Counts one token per whitespace-separated word (nothing is billed).
    fn embed(&self, texts: &[&str]) -> Result<Embeddings, EmbedError> {
        let tokens = texts.iter().map(|t| t.split_whitespace().count() as u64).sum();
        Ok(Embeddings { vectors: texts.iter().map(|t| self.embed_one(t)).collect(), tokens })
    }
}

/// 64-bit FNV-1a over the n-gram's characters, seeded by n so that a
/// 2-gram and a 3-gram never share a hash by construction.
fn fnv1a(gram: &[char], seed: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET ^ seed;
    for c in gram {
        for b in (*c as u32).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::vector::cosine;

    #[test]
    fn deterministic_normalised_and_similarity_preserving() {
        let e = HashEmbedder::new(384);
        let a = e.embed_one("How much does the ticket cost?");
        assert_eq!(a, e.embed_one("how much does the  ticket cost?"));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let similar = cosine(&a, &e.embed_one("how much does a ticket cost"));
        let unrelated = cosine(&a, &e.embed_one("I loved your last video, thanks!"));
        assert!(similar > 0.7, "similar texts: {similar}");
        assert!(unrelated < 0.3, "unrelated texts: {unrelated}");
    }

    #[test]
    fn emoji_only_text_has_a_vector() {
        let v = HashEmbedder::new(64).embed_one("🔥🔥");
        assert!(v.iter().any(|x| *x != 0.0));
    }
}
