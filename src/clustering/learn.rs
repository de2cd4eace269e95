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

#[cfg(test)]
mod tests {
    use super::*;

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
