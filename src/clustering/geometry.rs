//! Constructed geometry for the rule's unit tests: parameters with round
//! thresholds and no prior, and unit vectors at chosen cosines.

use super::{Params, learn::Learning};

pub fn params() -> Params {
    Params {
        trigram_threshold: 0.7,
        trigram_members: 8,
        core_threshold: 0.6,
        review_threshold: 0.5,
        background_prior: 0.0,
        background_prior_pairs: 0.0,
        learning: Learning { rate: 0.5, margin: 0.02, min_offset: -0.1, max_offset: 0.2 },
    }
}

/// The unit vector along axis `i`.
pub fn axis(i: usize, dims: usize) -> Vec<f32> {
    let mut v = vec![0.0; dims];
    v[i] = 1.0;
    v
}

/// A unit vector at cosine `c` to axis `i`, the rest along axis `j`.
pub fn at(c: f32, i: usize, j: usize, dims: usize) -> Vec<f32> {
    let mut v = vec![0.0; dims];
    v[i] = c;
    v[j] = (1.0 - c * c).sqrt();
    v
}
