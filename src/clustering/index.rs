//! One creator's open clusters, in memory.

use std::collections::VecDeque;

use uuid::Uuid;

use super::{Params, relative, trigram::Trigrams};
use crate::protocol::Membership;

/// An open cluster as the decision sees it.
#[derive(Debug, Clone)]
pub struct OpenCluster {
    pub id: Uuid,
    /// Sum of the core members' embeddings (as stored in
    /// `clusters.centroid`).
    pub sum: Vec<f32>,
    pub core_size: i64,
    /// Core and review members.
    pub size: i64,
    /// Trigrams of the most recent core members, newest last.
    trigrams: VecDeque<Trigrams>,
}

impl OpenCluster {
    pub fn new(id: Uuid, sum: Vec<f32>, core_size: i64, size: i64) -> Self {
        Self { id, sum, core_size, size, trigrams: VecDeque::new() }
    }

    /// Remembers a core member's trigrams, forgetting the oldest beyond
    /// `cap`.
    pub fn remember(&mut self, trigrams: Trigrams, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.trigrams.len() == cap {
            self.trigrams.pop_front();
        }
        self.trigrams.push_back(trigrams);
    }
}

/// What a creator's messages look like together: the sum of all their
/// (unit) embeddings and their count, whose mean pairwise similarity is the
/// background the bars are relative to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Background {
    pub sum: Vec<f32>,
    pub count: i64,
}

impl Background {
    /// The mean similarity between two different messages of the creator,
    /// `(|sum|^2 - n) / (n (n - 1))` for unit embeddings, blended with the
    /// prior while the creator has few messages.
    pub fn mean_similarity(&self, params: &Params) -> f32 {
        if self.count < 2 {
            return params.background_prior;
        }
        let n = self.count as f64;
        let pairs = n * (n - 1.0) / 2.0;
        let prior = f64::from(params.background_prior);
        let norm_sq: f64 = self.sum.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
        let measured = ((norm_sq - n) / (n * (n - 1.0))).clamp(-1.0, 1.0);
        let weight = pairs / (pairs + f64::from(params.background_prior_pairs).max(0.0));
        (weight * measured + (1.0 - weight) * prior) as f32
    }

    /// Counts one more message (a unit embedding).
    pub fn observe(&mut self, unit: &[f32]) {
        if self.sum.len() != unit.len() {
            self.sum = vec![0.0; unit.len()];
        }
        self.sum.iter_mut().zip(unit).for_each(|(s, x)| *s += x);
        self.count += 1;
    }
}

/// Why a message goes where it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Identical normalised text to a core member.
    Exact,
    /// pg_trgm similarity to a core member.
    Trigram { similarity: f32 },
    /// The average similarity to the cluster's core members, and that
    /// similarity relative to the creator's background.
    Core { similarity: f32, score: f32 },
    /// The cosine to the cluster's core centroid, and that cosine relative
    /// to the creator's background.
    Review { similarity: f32, score: f32 },
    /// Nothing close enough.
    New,
}

impl Reason {
    /// The step's name, as metrics label it.
    pub fn step(&self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Trigram { .. } => "trigram",
            Self::Core { .. } => "vector",
            Self::Review { .. } => "review",
            Self::New => "new",
        }
    }
}

/// Where a message goes: an open cluster, or a new one (`cluster: None`),
/// as what kind of member, and its average similarity to the cluster's
/// core members at the time (1 for the first member of a new cluster).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub cluster: Option<Uuid>,
    pub membership: Membership,
    pub similarity: f32,
    pub reason: Reason,
}

/// A creator's open clusters: their core sums side by side (one contiguous
/// matrix, scanned in full for every message: a creator's open clusters
/// number in the hundreds or thousands, microseconds of work), sizes and
/// recent core members' trigrams; the creator's background and learned
/// bar offset.
#[derive(Debug, Clone)]
pub struct CreatorIndex {
    /// The creator's last event id when this index matched the database.
    pub version: i64,
    pub background: Background,
    /// Added to both bars; learned from the creator's corrections.
    pub bar_offset: f32,
    dimensions: usize,
    clusters: Vec<OpenCluster>,
    /// Row `i` is `clusters[i].sum`.
    sums: Vec<f32>,
    /// `|clusters[i].sum|`.
    norms: Vec<f32>,
}

impl CreatorIndex {
    pub fn new(version: i64, dimensions: usize) -> Self {
        Self {
            version,
            background: Background::default(),
            bar_offset: 0.0,
            dimensions,
            clusters: Vec::new(),
            sums: Vec::new(),
            norms: Vec::new(),
        }
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    pub fn clusters(&self) -> &[OpenCluster] {
        &self.clusters
    }

    /// Adds an open cluster (loading, or a new cluster just decided).
    pub fn insert(&mut self, cluster: OpenCluster) {
        assert_eq!(cluster.sum.len(), self.dimensions, "centroid of another dimension");
        self.sums.extend_from_slice(&cluster.sum);
        self.norms.push(norm(&cluster.sum));
        self.clusters.push(cluster);
    }

    fn position(&self, id: Uuid) -> Option<usize> {
        self.clusters.iter().position(|c| c.id == id)
    }

    /// Finds a cluster by id.
    pub fn get_mut(&mut self, id: Uuid) -> Option<&mut OpenCluster> {
        self.clusters.iter_mut().find(|c| c.id == id)
    }

    /// Adds a member to an open cluster: a core member shapes it (sum,
    /// core size, trigrams), a review member only counts. Returns false if
    /// the cluster is not in the index.
    pub fn join(
        &mut self,
        id: Uuid,
        embedding: &[f32],
        trigrams: Trigrams,
        membership: Membership,
        cap: usize,
    ) -> bool {
        let Some(i) = self.position(id) else { return false };
        let cluster = &mut self.clusters[i];
        cluster.size += 1;
        if membership == Membership::Core {
            cluster.sum.iter_mut().zip(embedding).for_each(|(s, x)| *s += x);
            cluster.core_size += 1;
            cluster.remember(trigrams, cap);
            self.sums[i * self.dimensions..(i + 1) * self.dimensions].copy_from_slice(&cluster.sum);
            self.norms[i] = norm(&cluster.sum);
        }
        true
    }

    /// The average similarity of a unit vector to cluster `i`'s core.
    fn average(&self, i: usize, unit: &[f32]) -> f32 {
        let core = self.clusters[i].core_size;
        if core == 0 { 0.0 } else { dot(unit, self.row(i)) / core as f32 }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.sums[i * self.dimensions..(i + 1) * self.dimensions]
    }

    /// Decides where a message goes. `exact` is an open cluster holding
    /// the same normalised text in a core member, if the caller found one.
    pub fn decide(&self, exact: Option<Uuid>, trigrams: &Trigrams, embedding: &[f32], params: &Params) -> Decision {
        let x = unit(embedding);
        let core = |i: usize, reason: Reason| Decision {
            cluster: Some(self.clusters[i].id),
            membership: Membership::Core,
            similarity: self.average(i, &x),
            reason,
        };
        if let Some(i) = exact.and_then(|id| self.position(id)) {
            return core(i, Reason::Exact);
        }
        if params.trigram_enabled() && !trigrams.is_empty() {
            let mut best: Option<(f32, usize)> = None;
            for (i, cluster) in self.clusters.iter().enumerate() {
                for member in &cluster.trigrams {
                    let s = member.similarity(trigrams);
                    if s >= params.trigram_threshold && best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i));
                    }
                }
            }
            if let Some((similarity, i)) = best {
                return core(i, Reason::Trigram { similarity });
            }
        }
        self.decide_vector(&x, params)
    }

    /// Steps 3 and 4 of the rule: the best average similarity for a core
    /// join, else the nearest centroid for a review join.
    fn decide_vector(&self, x: &[f32], params: &Params) -> Decision {
        let new = Decision { cluster: None, membership: Membership::Core, similarity: 1.0, reason: Reason::New };
        let mut best_average: Option<(f32, usize)> = None;
        let mut best_cosine: Option<(f32, usize)> = None;
        for (i, cluster) in self.clusters.iter().enumerate() {
            if cluster.core_size == 0 || self.norms[i] == 0.0 {
                continue;
            }
            let d = dot(x, self.row(i));
            let (average, cosine) = (d / cluster.core_size as f32, d / self.norms[i]);
            if best_average.is_none_or(|(b, _)| average > b) {
                best_average = Some((average, i));
            }
            if best_cosine.is_none_or(|(b, _)| cosine > b) {
                best_cosine = Some((cosine, i));
            }
        }
        let mu = self.background.mean_similarity(params);
        if let Some((similarity, i)) = best_average {
            let score = relative(similarity, mu);
            if score >= params.core_threshold + self.bar_offset {
                let reason = Reason::Core { similarity, score };
                return Decision {
                    cluster: Some(self.clusters[i].id),
                    membership: Membership::Core,
                    similarity,
                    reason,
                };
            }
        }
        if let Some((similarity, i)) = best_cosine {
            let score = relative(similarity, mu);
            if score >= params.review_threshold + self.bar_offset {
                return Decision {
                    cluster: Some(self.clusters[i].id),
                    membership: Membership::Review,
                    similarity: self.average(i, x),
                    reason: Reason::Review { similarity, score },
                };
            }
        }
        new
    }
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

/// `v / |v|`; a zero vector stays zero.
pub fn unit(v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    crate::domain::vector::normalise(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clustering::geometry::{at, axis, params};

    #[test]
    fn exact_then_trigram_then_vector() {
        let mut index = CreatorIndex::new(0, 4);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        index.insert(OpenCluster::new(a, axis(0, 4), 1, 1));
        index.insert(OpenCluster::new(b, axis(1, 4), 1, 1));
        index.get_mut(b).expect("b").remember(Trigrams::of("how much is the vip ticket"), 8);
        let p = params();
        let tri = Trigrams::of("how much is the vip ticket?");
        let d = index.decide(Some(a), &tri, &axis(1, 4), &p);
        assert_eq!((d.reason, d.membership, d.similarity), (Reason::Exact, Membership::Core, 0.0));
        let d = index.decide(None, &tri, &axis(0, 4), &p);
        assert_eq!(d.cluster, Some(b));
        assert!(matches!(d.reason, Reason::Trigram { .. }));
        let d = index.decide(None, &Trigrams::of("unrelated"), &axis(0, 4), &p);
        assert_eq!((d.cluster, d.membership), (Some(a), Membership::Core));
        assert!(matches!(d.reason, Reason::Core { similarity, .. } if similarity == 1.0));
        // An exact match in a cluster this index does not hold is ignored.
        assert_eq!(index.decide(Some(Uuid::now_v7()), &Trigrams::of("x"), &axis(2, 4), &p).cluster, None);
    }

    #[test]
    fn average_linkage_resists_drift() {
        // A cluster whose core members spread out (0.7 apart from the
        // middle, each), and a message at 0.75 to its centroid: close to the
        // centroid, but not to the members, on average.
        let dims = 8;
        let mut index = CreatorIndex::new(0, dims);
        let id = Uuid::now_v7();
        let members = [at(0.7, 0, 1, dims), at(0.7, 0, 2, dims), at(0.7, 0, 3, dims), at(0.7, 0, 4, dims)];
        let mut sum = vec![0.0; dims];
        members.iter().for_each(|m| sum.iter_mut().zip(m).for_each(|(s, x)| *s += x));
        index.insert(OpenCluster::new(id, sum, 4, 4));
        let x = at(0.75, 0, 5, dims);
        let centroid_cosine = crate::domain::vector::cosine(&x, &index.clusters()[0].sum);
        assert!(centroid_cosine > 0.6, "{centroid_cosine}");
        let d = index.decide(None, &Trigrams::default(), &x, &Params { review_threshold: 2.0, ..params() });
        assert_eq!(d.cluster, None, "the average similarity is {}", dot(&x, &index.clusters()[0].sum) / 4.0);
    }

    #[test]
    fn weaker_evidence_joins_for_review_and_does_not_shape_the_cluster() {
        let dims = 4;
        let mut index = CreatorIndex::new(0, dims);
        let id = Uuid::now_v7();
        index.insert(OpenCluster::new(id, axis(0, dims), 1, 1));
        let p = params();
        let x = at(0.55, 0, 1, dims); // above the review bar 0.5, below the core bar 0.6
        let d = index.decide(None, &Trigrams::default(), &x, &p);
        assert_eq!((d.cluster, d.membership), (Some(id), Membership::Review));
        assert!(index.join(id, &x, Trigrams::of("x"), Membership::Review, 8));
        let c = &index.clusters()[0];
        assert_eq!((c.sum.clone(), c.core_size, c.size, c.trigrams.len()), (axis(0, dims), 1, 2, 0));
        // Below both bars: a new cluster.
        assert_eq!(index.decide(None, &Trigrams::default(), &at(0.4, 0, 1, dims), &p).cluster, None);
    }

    #[test]
    fn the_bars_are_relative_to_the_creator_background() {
        let dims = 4;
        let p = Params { review_threshold: 2.0, ..params() };
        let mut index = CreatorIndex::new(0, dims);
        let id = Uuid::now_v7();
        index.insert(OpenCluster::new(id, axis(0, dims), 1, 1));
        let x = at(0.7, 0, 1, dims);
        // Background 0: a cosine of 0.7 scores 0.7 and joins.
        assert!(index.decide(None, &Trigrams::default(), &x, &p).cluster.is_some());
        // A creator whose messages are all alike (mean similarity 0.75):
        // the same cosine scores (0.7 - 0.75) / 0.25 < 0, below the bar.
        let m = at(0.5f32.sqrt(), 0, 1, dims);
        let n = at(0.5f32.sqrt(), 0, 2, dims);
        index.background = Background::default();
        for _ in 0..500 {
            index.background.observe(&m);
            index.background.observe(&n);
        }
        let mu = index.background.mean_similarity(&p);
        assert!((mu - 0.75).abs() < 0.01, "{mu}");
        assert_eq!(index.decide(None, &Trigrams::default(), &x, &p).cluster, None);
        // And a learned offset moves the bar.
        index.background = Background::default();
        index.bar_offset = 0.15;
        assert_eq!(index.decide(None, &Trigrams::default(), &x, &p).cluster, None);
    }

    #[test]
    fn the_background_blends_the_prior_while_a_creator_is_new() {
        let p = Params { background_prior: 0.2, background_prior_pairs: 10.0, ..params() };
        let mut b = Background::default();
        assert_eq!(b.mean_similarity(&p), 0.2);
        let x = axis(0, 3);
        for _ in 0..5 {
            b.observe(&x);
        }
        // 10 pairs measured at 1.0, 10 of prior at 0.2.
        assert!((b.mean_similarity(&p) - 0.6).abs() < 1e-6);
    }
}
