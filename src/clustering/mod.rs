//! The clustering decision, in memory: per creator, an index of its open
//! clusters (the sums of their core members' embeddings, and the trigrams
//! of recent core members), the creator's background (the sum and count of
//! all its embeddings) and its learned bar offset; and the rule that places
//! a new message. The database stays the truth: the clustering actor
//! rebuilds a creator's index from it whenever anything else changed the
//! creator's clusters (see `actors::clustering`).
//!
//! Precision first (SPEC): a reply to a cluster reaches its `core`
//! members, so a message joins as core only on strong evidence, and on
//! weaker evidence joins as `review`, for the creator to confirm. The rule,
//! in the order of SPEC's clustering semantics:
//! 1. identical normalised text to a core member of an open cluster: core;
//! 2. the best trigram match among recent core members, at or above
//!    `trigram_threshold`: core;
//! 3. the open cluster with the highest *average* similarity of the message
//!    to its core members (average linkage: a loose or drifting cluster
//!    scores lower, never higher, as it grows), if that similarity, made
//!    relative to the creator's background, clears `core_threshold`: core;
//! 4. else the open cluster with the nearest core centroid, if its cosine,
//!    made relative, clears `review_threshold`: review;
//! 5. otherwise a new cluster.
//!
//! "Relative to the creator's background" ([`relative`]): `(s - mu) /
//! (1 - mu)`, where `mu` is the mean similarity between two of the
//! creator's messages. For a creator whose visitors ask about everything
//! (mu about 0.08 with all-MiniLM-L6-v2), a core join needs an average
//! cosine of about 0.63; for a creator whose questions are all about one
//! product (mu 0.3), about 0.72. The bars follow the creator's own data,
//! not a cosine tuned on one data set. Both bars move by the creator's
//! `bar_offset`, learned from its corrections ([`learn`]).
//!
//! [`group`] runs the rule over a group of messages in arrival order and
//! says what the group changes, for the repository to write.

#[cfg(test)]
mod geometry;
pub mod group;
mod index;
pub mod learn;
pub mod trigram;

pub use index::{Background, CreatorIndex, Decision, OpenCluster, Reason, unit};

use crate::settings::ClusteringSettings;

/// The parameters of the decision (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub trigram_threshold: f32,
    /// Recent core members per open cluster whose trigrams are kept.
    pub trigram_members: usize,
    /// Relative average similarity at or above which a message joins as
    /// core.
    pub core_threshold: f32,
    /// Relative centroid similarity at or above which a message joins as
    /// review.
    pub review_threshold: f32,
    /// The background similarity assumed before a creator has messages.
    pub background_prior: f32,
    /// How many pairs of messages the prior weighs as.
    pub background_prior_pairs: f32,
    pub learning: learn::Learning,
}

impl Params {
    /// Whether the trigram step runs at all.
    pub fn trigram_enabled(&self) -> bool {
        self.trigram_members > 0
    }
}

impl From<&ClusteringSettings> for Params {
    fn from(s: &ClusteringSettings) -> Self {
        Self {
            trigram_threshold: s.trigram_threshold,
            trigram_members: s.trigram_members,
            core_threshold: s.core_threshold,
            review_threshold: s.review_threshold,
            background_prior: s.background_prior,
            background_prior_pairs: s.background_prior_pairs,
            learning: learn::Learning {
                rate: s.learning_rate,
                margin: s.learning_margin,
                min_offset: s.min_bar_offset,
                max_offset: s.max_bar_offset,
            },
        }
    }
}

/// A similarity made relative to a background similarity `mu`: 0 at the
/// background, 1 at identity.
pub fn relative(similarity: f32, mu: f32) -> f32 {
    (similarity - mu) / (1.0 - mu).max(1e-3)
}
