//! Offline references on the same embeddings: agglomerative clustering with
//! average linkage on cosine distance (kodama), cut at every threshold of a
//! grid, and k-means with the true number of classes (clustering crate).
//! An offline method sees every message before it decides anything: what
//! an online rule can hope to approach.

use crate::{
    data::Dataset,
    metrics::{Scores, score},
};

/// One cut of the average-linkage dendrogram.
pub struct Cut {
    pub threshold: f64,
    pub scores: Scores,
}

/// Average linkage over cosine distance, cut at each threshold (a cosine
/// *similarity* of at least `1 - threshold` between the merged groups).
pub fn average_linkage(data: &Dataset, thresholds: &[f64]) -> Vec<Cut> {
    let n = data.vectors.len();
    let mut condensed = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            condensed.push(1.0 - f64::from(dot(&data.vectors[i], &data.vectors[j])));
        }
    }
    let dendrogram = kodama::linkage(&mut condensed, n, kodama::Method::Average);
    thresholds
        .iter()
        .map(|&threshold| {
            // Step k creates cluster n + k from two earlier ones.
            let mut parent: Vec<usize> = (0..n + dendrogram.steps().len()).collect();
            for (k, step) in dendrogram.steps().iter().enumerate() {
                if step.dissimilarity <= threshold {
                    parent[step.cluster1] = n + k;
                    parent[step.cluster2] = n + k;
                }
            }
            let root = |mut i: usize| {
                while parent[i] != i {
                    i = parent[i];
                }
                i
            };
            let predicted: Vec<usize> = (0..n).map(root).collect();
            Cut { threshold, scores: score(&data.labels, &predicted) }
        })
        .collect()
}

/// The fewest wrong replies any cut reaches at a V-measure of at least `v`:
/// the offline reference at a matched V.
pub fn best_at(cuts: &[Cut], v: f64) -> Option<&Cut> {
    cuts.iter().filter(|c| c.scores.v_measure >= v).min_by(|a, b| a.scores.wrong_reply.total_cmp(&b.scores.wrong_reply))
}

/// The cut grid: cosine distances 0.10-0.80 in steps of 0.01.
pub fn grid() -> Vec<f64> {
    (10..=80).map(|i| f64::from(i) / 100.0).collect()
}

struct Point<'a>(&'a [f32]);

impl clustering::Elem for Point<'_> {
    fn dimensions(&self) -> usize {
        self.0.len()
    }

    fn at(&self, i: usize) -> f64 {
        f64::from(self.0[i])
    }
}

/// k-means (Lloyd, random initial centres) with k = the number of classes,
/// on unit vectors (so Euclidean distance ranks like cosine).
pub fn kmeans(data: &Dataset, iterations: usize) -> Scores {
    let points: Vec<Point> = data.vectors.iter().map(|v| Point(v)).collect();
    let result = clustering::kmeans(data.classes(), &points, iterations);
    score(&data.labels, &result.membership)
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
