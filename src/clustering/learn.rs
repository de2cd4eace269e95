//! Learning from a creator's corrections. A removal (or a move out, or a
//! rejected review member) says that a message differs from the cluster it
//! was in; a merge, a move in or a confirmed review member says that it
//! matches. Each is evidence about the creator's bar: the score `z` (see
//! [`super::relative`]) of the message against the cluster's core should
//! have been below the core bar, or at or above it. The creator's
//! `bar_offset`, added to both bars, moves part of the way towards the
//! evidence when the evidence disagrees with the bar, and stays within
//! bounds, so that one careless click cannot make a creator's clusters
//! useless.

/// One correction, with the score of the message (or of the merged
/// cluster) against the cluster's core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Correction {
    /// The creator separated them: the bar should stand above `z`.
    Differ { z: f32 },
    /// The creator put them together: `z` should clear the bar.
    Match { z: f32 },
}

/// How corrections move the bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Learning {
    /// Share of the disagreement the offset moves by (0: never learns).
    pub rate: f32,
    /// How far above a separated score the bar should end.
    pub margin: f32,
    /// The offset's bounds.
    pub min_offset: f32,
    pub max_offset: f32,
}

/// The creator's new bar offset after one correction. `core_bar` is the
/// configured core bar; the creator's effective bar is `core_bar + offset`.
pub fn corrected_offset(offset: f32, core_bar: f32, correction: Correction, learning: &Learning) -> f32 {
    let bar = core_bar + offset;
    let shift = match correction {
        Correction::Differ { z } if z + learning.margin > bar => learning.rate * (z + learning.margin - bar),
        Correction::Match { z } if z < bar => -learning.rate * (bar - z),
        _ => 0.0,
    };
    if !shift.is_finite() {
        return offset;
    }
    (offset + shift).clamp(learning.min_offset, learning.max_offset)
}

/// A message's average similarity to a cluster's core members
/// (`core_sum` is the sum of their embeddings, `core_size` their count).
/// `exclude` takes the message itself out of the core first (it is a core
/// member). `None` when no core member is left to compare with.
pub fn average_similarity(core_sum: &[f32], core_size: i64, embedding: &[f32], exclude: bool) -> Option<f32> {
    let x = super::unit(embedding);
    let (mut dot, mut n) = (super::index::dot(&x, core_sum), core_size as f32);
    if exclude {
        dot -= 1.0;
        n -= 1.0;
    }
    (n > 0.0).then(|| dot / n)
}

/// The evidence of a message against a cluster's core: its
/// [`average_similarity`], relative to the creator's background `mu`.
pub fn score(core_sum: &[f32], core_size: i64, embedding: &[f32], exclude: bool, mu: f32) -> Option<f32> {
    average_similarity(core_sum, core_size, embedding, exclude).map(|s| super::relative(s, mu))
}

/// The evidence of two clusters against each other: the average
/// similarity between a core member of one and a core member of the other
/// (average linkage), relative to the creator's background `mu`.
pub fn linkage(a_sum: &[f32], a_size: i64, b_sum: &[f32], b_size: i64, mu: f32) -> Option<f32> {
    let pairs = (a_size * b_size) as f32;
    (pairs > 0.0).then(|| super::relative(super::index::dot(a_sum, b_sum) / pairs, mu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_score_can_leave_the_message_out_of_the_core() {
        // A core of two members along axes 0 and 1; background 0.
        let sum = [1.0, 1.0, 0.0];
        let x = [1.0, 0.0, 0.0];
        assert_eq!(score(&sum, 2, &x, true, 0.0), Some(0.0));
        assert_eq!(score(&sum, 2, &x, false, 0.0), Some(0.5));
        // Relative to a background of 0.5, an average of 0.5 scores 0.
        assert_eq!(score(&sum, 2, &x, false, 0.5), Some(0.0));
        assert_eq!(score(&[1.0, 0.0, 0.0], 1, &x, true, 0.0), None);
    }

    #[test]
    fn linkage_averages_over_every_pair_of_core_members() {
        // Two members at axis 0, against one at axis 0 and one at axis 1:
        // the four pairs have similarities 1, 1, 0, 0.
        assert_eq!(linkage(&[2.0, 0.0], 2, &[1.0, 1.0], 2, 0.0), Some(0.5));
        assert_eq!(linkage(&[2.0, 0.0], 2, &[0.0, 0.0], 0, 0.0), None);
    }

    const LEARNING: Learning = Learning { rate: 0.5, margin: 0.02, min_offset: -0.1, max_offset: 0.2 };

    #[test]
    fn a_removal_above_the_bar_raises_it() {
        // Bar 0.6; a removed member scored 0.7: the bar moves half way to 0.72.
        let offset = corrected_offset(0.0, 0.6, Correction::Differ { z: 0.7 }, &LEARNING);
        assert!((offset - 0.06).abs() < 1e-6, "{offset}");
        // A removal well below the bar says nothing new.
        assert_eq!(corrected_offset(0.0, 0.6, Correction::Differ { z: 0.3 }, &LEARNING), 0.0);
    }

    #[test]
    fn a_match_below_the_bar_lowers_it() {
        let offset = corrected_offset(0.0, 0.6, Correction::Match { z: 0.5 }, &LEARNING);
        assert!((offset + 0.05).abs() < 1e-6, "{offset}");
        assert_eq!(corrected_offset(0.0, 0.6, Correction::Match { z: 0.8 }, &LEARNING), 0.0);
    }

    #[test]
    fn the_offset_stays_within_its_bounds() {
        let mut offset = 0.0;
        for _ in 0..50 {
            offset = corrected_offset(offset, 0.6, Correction::Differ { z: 0.99 }, &LEARNING);
        }
        assert_eq!(offset, 0.2);
        for _ in 0..50 {
            offset = corrected_offset(offset, 0.6, Correction::Match { z: 0.0 }, &LEARNING);
        }
        assert_eq!(offset, -0.1);
        assert_eq!(corrected_offset(0.05, 0.6, Correction::Match { z: f32::NAN }, &LEARNING), 0.05);
    }
}
