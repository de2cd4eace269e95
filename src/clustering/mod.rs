//! The clustering decision, in memory: per creator, an index of its open
//! clusters (summed centroids and the trigrams of recent members), and the
//! rule that places a new message. The database stays the truth: the
//! clustering actor rebuilds a creator's index from it whenever anything
//! else changed the creator's clusters (see `actors::clustering`).
//!
//! The rule, in the order of SPEC's clustering semantics:
//! 1. identical normalised text in an open cluster: join it;
//! 2. the best trigram match among recent open-cluster members, at or above
//!    `trigram_threshold`: join its cluster;
//! 3. the nearest open centroid by cosine similarity `s1`, if `s1` clears
//!    one of two bars. The absolute one, `sure_threshold`, is a similarity
//!    at which two questions are the same in any domain. The adaptive one
//!    admits a looser paraphrase when it stands out: `s1 >=
//!    vector_threshold` and `s1` lies at least `vector_z` standard
//!    deviations above the mean similarity of the message to all the
//!    creator's open clusters. Where a creator's questions are varied, a
//!    paraphrase at 0.45 stands out and joins; where they are all alike (a
//!    fine-grained domain) nothing stands out, and only the absolute bar
//!    admits. With fewer than `min_reference_clusters` open clusters there
//!    is no spread to measure, and `cold_threshold` is the one bar;
//! 4. otherwise a new cluster.

mod index;
pub mod trigram;

pub use index::{CreatorIndex, Decision, OpenCluster, Reason};

use crate::settings::ClusteringSettings;

/// The parameters of the decision (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub trigram_threshold: f32,
    pub vector_threshold: f32,
    pub vector_z: f32,
    pub min_reference_clusters: usize,
    pub cold_threshold: f32,
    /// Similarity at which the vector step joins whatever the spread.
    pub sure_threshold: f32,
    /// Recent members per open cluster whose trigrams are kept.
    pub trigram_members: usize,
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
            vector_threshold: s.vector_threshold,
            vector_z: s.vector_z,
            min_reference_clusters: s.min_reference_clusters,
            cold_threshold: s.cold_threshold,
            sure_threshold: s.sure_threshold,
            trigram_members: s.trigram_members,
        }
    }
}
