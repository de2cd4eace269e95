//! One creator's open clusters, in memory.

use std::collections::VecDeque;

use uuid::Uuid;

use super::{Params, trigram::Trigrams};

/// An open cluster as the decision sees it.
#[derive(Debug, Clone)]
pub struct OpenCluster {
    pub id: Uuid,
    /// Sum of the member embeddings (as stored in `clusters.centroid`).
    pub sum: Vec<f32>,
    pub size: i64,
    /// Trigrams of the most recent members, newest last.
    trigrams: VecDeque<Trigrams>,
}

impl OpenCluster {
    pub fn new(id: Uuid, sum: Vec<f32>, size: i64) -> Self {
        Self { id, sum, size, trigrams: VecDeque::new() }
    }

    /// Remembers a member's trigrams, forgetting the oldest beyond `cap`.
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

/// Why a message goes where it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Identical normalised text.
    Exact,
    /// pg_trgm similarity to a member.
    Trigram { similarity: f32 },
    /// Cosine similarity to the centroid, and how many standard deviations
    /// it stands above the mean over the open clusters (None: cold start).
    Vector { similarity: f32, z: Option<f32> },
    /// Nothing close enough.
    New,
}

/// Where a message goes: an open cluster, or a new one (`cluster: None`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub cluster: Option<Uuid>,
    pub reason: Reason,
}

/// A creator's open clusters: their unit centroids side by side (one
/// contiguous matrix, scanned in full for every message: a creator's open
/// clusters number in the hundreds or thousands, microseconds of work),
/// sums, sizes and recent members' trigrams.
#[derive(Debug, Clone)]
pub struct CreatorIndex {
    /// The creator's last event id when this index matched the database.
    pub version: i64,
    dimensions: usize,
    clusters: Vec<OpenCluster>,
    /// Row `i` is `clusters[i].sum`, L2-normalised.
    units: Vec<f32>,
}

impl CreatorIndex {
    pub fn new(version: i64, dimensions: usize) -> Self {
        Self { version, dimensions, clusters: Vec::new(), units: Vec::new() }
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
        self.units.extend(unit(&cluster.sum));
        self.clusters.push(cluster);
    }

    fn position(&self, id: Uuid) -> Option<usize> {
        self.clusters.iter().position(|c| c.id == id)
    }

    /// Finds a cluster by id.
    pub fn get_mut(&mut self, id: Uuid) -> Option<&mut OpenCluster> {
        self.clusters.iter_mut().find(|c| c.id == id)
    }

    /// Adds a member to an open cluster: sum, size, trigrams, unit row.
    /// Returns false if the cluster is not in the index.
    pub fn join(&mut self, id: Uuid, embedding: &[f32], trigrams: Trigrams, cap: usize) -> bool {
        let Some(i) = self.position(id) else { return false };
        let cluster = &mut self.clusters[i];
        cluster.sum.iter_mut().zip(embedding).for_each(|(s, x)| *s += x);
        cluster.size += 1;
        cluster.remember(trigrams, cap);
        let row = unit(&cluster.sum);
        self.units[i * self.dimensions..(i + 1) * self.dimensions].copy_from_slice(&row);
        true
    }

    /// Decides where a message goes. `exact` is an open cluster holding
    /// the same normalised text, if the caller found one.
    pub fn decide(&self, exact: Option<Uuid>, trigrams: &Trigrams, embedding: &[f32], params: &Params) -> Decision {
        if let Some(id) = exact.filter(|id| self.position(*id).is_some()) {
            return Decision { cluster: Some(id), reason: Reason::Exact };
        }
        if params.trigram_enabled() && !trigrams.is_empty() {
            let mut best: Option<(f32, Uuid)> = None;
            for cluster in &self.clusters {
                for member in &cluster.trigrams {
                    let s = member.similarity(trigrams);
                    if s >= params.trigram_threshold && best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, cluster.id));
                    }
                }
            }
            if let Some((similarity, id)) = best {
                return Decision { cluster: Some(id), reason: Reason::Trigram { similarity } };
            }
        }
        self.decide_vector(embedding, params)
    }

    /// Step 3 of the rule: the nearest centroid, if it stands out.
    fn decide_vector(&self, embedding: &[f32], params: &Params) -> Decision {
        let new = Decision { cluster: None, reason: Reason::New };
        if self.clusters.is_empty() {
            return new;
        }
        let x = unit(embedding);
        let (mut best, mut s1) = (0, f32::NEG_INFINITY);
        let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
        for (i, row) in self.units.chunks_exact(self.dimensions).enumerate() {
            let s = dot(&x, row);
            if s > s1 {
                (best, s1) = (i, s);
            }
            sum += f64::from(s);
            sum_sq += f64::from(s) * f64::from(s);
        }
        let k = self.clusters.len();
        let (joins, z) = if k < params.min_reference_clusters {
            (s1 >= params.cold_threshold, None)
        } else {
            let mean = sum / k as f64;
            let sd = (sum_sq / k as f64 - mean * mean).max(0.0).sqrt().max(1e-6);
            let z = ((f64::from(s1) - mean) / sd) as f32;
            (s1 >= params.sure_threshold || (s1 >= params.vector_threshold && z >= params.vector_z), Some(z))
        };
        if joins {
            Decision { cluster: Some(self.clusters[best].id), reason: Reason::Vector { similarity: s1, z } }
        } else {
            new
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `v / |v|`; a zero vector stays zero.
fn unit(v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    crate::domain::vector::normalise(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            trigram_threshold: 0.7,
            vector_threshold: 0.4,
            vector_z: 4.5,
            min_reference_clusters: 10,
            cold_threshold: 0.55,
            sure_threshold: 0.6,
            trigram_members: 8,
        }
    }

    fn axis(i: usize, dims: usize) -> Vec<f32> {
        let mut v = vec![0.0; dims];
        v[i] = 1.0;
        v
    }

    #[test]
    fn exact_then_trigram_then_vector() {
        let mut index = CreatorIndex::new(0, 4);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        index.insert(OpenCluster::new(a, axis(0, 4), 1));
        index.insert(OpenCluster::new(b, axis(1, 4), 1));
        index.get_mut(b).expect("b").remember(Trigrams::of("how much is the vip ticket"), 8);
        let p = params();
        let tri = Trigrams::of("how much is the vip ticket?");
        assert_eq!(index.decide(Some(a), &tri, &axis(1, 4), &p).reason, Reason::Exact);
        let d = index.decide(None, &tri, &axis(0, 4), &p);
        assert_eq!(d.cluster, Some(b));
        assert!(matches!(d.reason, Reason::Trigram { .. }));
        let d = index.decide(None, &Trigrams::of("unrelated"), &axis(0, 4), &p);
        assert_eq!(d, Decision { cluster: Some(a), reason: Reason::Vector { similarity: 1.0, z: None } });
        // An exact match in a cluster this index does not hold is ignored.
        assert_eq!(index.decide(Some(Uuid::now_v7()), &Trigrams::of("x"), &axis(2, 4), &p).cluster, None);
    }

    /// Forty clusters on distinct axes of a 64-dimensional space.
    fn forty_axes() -> CreatorIndex {
        let mut index = CreatorIndex::new(0, 64);
        for i in 0..40 {
            index.insert(OpenCluster::new(Uuid::now_v7(), axis(i, 64), 1));
        }
        index
    }

    #[test]
    fn a_looser_match_joins_when_it_stands_out() {
        let (index, p, none) = (forty_axes(), params(), Trigrams::default());
        // Cosine 0.55 to cluster 0 (below sure_threshold), 0 to the rest.
        let mut x = axis(0, 64);
        x[50] = 1.5;
        let d = index.decide(None, &none, &x, &p);
        assert!(matches!(d.reason, Reason::Vector { z: Some(z), .. } if z >= p.vector_z), "{d:?}");
        // Cosine 0.43 to cluster 0, but about 0.4 to five others too:
        // nothing stands out, a new cluster.
        let mut y = vec![0.0; 64];
        y[0] = 0.9;
        y[1..6].fill(0.85);
        assert_eq!(index.decide(None, &none, &y, &p).cluster, None);
    }

    #[test]
    fn the_absolute_bar_admits_whatever_the_spread() {
        let index = forty_axes();
        let p = Params { vector_z: 100.0, ..params() };
        let none = Trigrams::default();
        let mut x = axis(0, 64);
        x[50] = 1.2; // cosine 0.64
        assert!(index.decide(None, &none, &x, &p).cluster.is_some());
        x[50] = 1.5; // cosine 0.55
        assert_eq!(index.decide(None, &none, &x, &p).cluster, None);
    }

    #[test]
    fn join_updates_sum_size_and_unit() {
        let mut index = CreatorIndex::new(3, 2);
        let a = Uuid::now_v7();
        index.insert(OpenCluster::new(a, vec![1.0, 0.0], 1));
        assert!(index.join(a, &[0.0, 1.0], Trigrams::of("b"), 1));
        assert!(!index.join(Uuid::now_v7(), &[0.0, 1.0], Trigrams::default(), 1));
        let c = &index.clusters()[0];
        assert_eq!((c.sum.clone(), c.size, c.trigrams.len()), (vec![1.0, 1.0], 2, 1));
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((index.units[0] - s).abs() < 1e-6 && (index.units[1] - s).abs() < 1e-6);
    }
}
