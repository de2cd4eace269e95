//! Scores of a clustering against true labels.
//!
//! On the clusters as the creator sees them (every member where it was
//! placed): homogeneity, completeness, V-measure (Rosenberg and Hirschberg,
//! 2007) and the adjusted Rand index (Hubert and Arabie, 1985), as
//! scikit-learn defines them, and clusters per intent.
//!
//! On the clusters as a reply answers them (issue 11): only `core` members
//! are answered, so each `review` member counts as a singleton:
//! - the wrong-reply rate: over the messages in answered clusters of two
//!   or more, the share whose intent differs from the majority intent of
//!   their cluster (the visitors who would receive an answer to someone
//!   else's question);
//! - pairwise precision (of the pairs answered together, the share with one
//!   intent) and recall (of the pairs with one intent, the share answered
//!   together);
//! - the share of messages in review.

use std::collections::HashMap;

/// One clustering's scores.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scores {
    pub homogeneity: f64,
    pub completeness: f64,
    pub v_measure: f64,
    pub ari: f64,
    pub clusters: usize,
    pub clusters_per_intent: f64,
    pub wrong_reply: f64,
    pub pair_precision: f64,
    pub pair_recall: f64,
    pub review: f64,
}

impl Scores {
    pub fn get(&self, field: &str) -> f64 {
        match field {
            "V" => self.v_measure,
            "h" => self.homogeneity,
            "c" => self.completeness,
            "ARI" => self.ari,
            "wrong" => self.wrong_reply,
            "pairP" => self.pair_precision,
            "pairR" => self.pair_recall,
            "review" => self.review,
            "clusters" => self.clusters as f64,
            "per_intent" => self.clusters_per_intent,
            _ => panic!("no score {field}"),
        }
    }
}

impl std::fmt::Display for Scores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "V {:.4}  h {:.4}  c {:.4}  ARI {:.4}  wrong {:5.2}%  pairP {:.3}  pairR {:.3}  review {:5.2}%  clusters {} ({:.2}/intent)",
            self.v_measure,
            self.homogeneity,
            self.completeness,
            self.ari,
            100.0 * self.wrong_reply,
            self.pair_precision,
            self.pair_recall,
            100.0 * self.review,
            self.clusters,
            self.clusters_per_intent
        )
    }
}

/// Entropy-based and pair-counting scores of `predicted` (any ids) against
/// `truth`, item by item: (h, c, V, ARI, clusters).
fn partition_scores<T: std::hash::Hash + Eq, P: std::hash::Hash + Eq>(
    truth: &[T],
    predicted: &[P],
) -> (f64, f64, f64, f64, usize) {
    assert_eq!(truth.len(), predicted.len(), "one prediction per item");
    let n = truth.len() as f64;
    let mut joint: HashMap<(&T, &P), f64> = HashMap::new();
    let mut classes: HashMap<&T, f64> = HashMap::new();
    let mut clusters: HashMap<&P, f64> = HashMap::new();
    for (t, p) in truth.iter().zip(predicted) {
        *joint.entry((t, p)).or_default() += 1.0;
        *classes.entry(t).or_default() += 1.0;
        *clusters.entry(p).or_default() += 1.0;
    }
    let entropy = |counts: &mut dyn Iterator<Item = f64>| -> f64 { counts.map(|c| -(c / n) * (c / n).ln()).sum() };
    let (h_c, h_k) = (entropy(&mut classes.values().copied()), entropy(&mut clusters.values().copied()));
    // H(C|K) = -sum n_ck/n log(n_ck / n_k), and symmetrically.
    let (mut h_c_given_k, mut h_k_given_c) = (0.0, 0.0);
    for (&(t, p), &c) in &joint {
        h_c_given_k -= c / n * (c / clusters[p]).ln();
        h_k_given_c -= c / n * (c / classes[t]).ln();
    }
    let homogeneity = if h_c == 0.0 { 1.0 } else { 1.0 - h_c_given_k / h_c };
    let completeness = if h_k == 0.0 { 1.0 } else { 1.0 - h_k_given_c / h_k };
    let v_measure = if homogeneity + completeness == 0.0 {
        0.0
    } else {
        2.0 * homogeneity * completeness / (homogeneity + completeness)
    };
    let pairs = |x: f64| x * (x - 1.0) / 2.0;
    let index: f64 = joint.values().map(|&c| pairs(c)).sum();
    let sum_a: f64 = classes.values().map(|&c| pairs(c)).sum();
    let sum_b: f64 = clusters.values().map(|&c| pairs(c)).sum();
    let expected = sum_a * sum_b / pairs(n);
    let max = (sum_a + sum_b) / 2.0;
    let ari = if max == expected { 1.0 } else { (index - expected) / (max - expected) };
    (homogeneity, completeness, v_measure, ari, clusters.len())
}

/// Scores a clustering without review members.
pub fn score<T: std::hash::Hash + Eq, P: std::hash::Hash + Eq + Clone>(truth: &[T], predicted: &[P]) -> Scores {
    score_with_review(truth, predicted, &vec![false; truth.len()])
}

/// Scores `predicted` (any ids) against `truth`; `review[i]` marks a member
/// that a reply would not answer.
pub fn score_with_review<T: std::hash::Hash + Eq, P: std::hash::Hash + Eq + Clone>(
    truth: &[T],
    predicted: &[P],
    review: &[bool],
) -> Scores {
    assert_eq!(truth.len(), review.len(), "one review flag per item");
    let (homogeneity, completeness, v_measure, ari, clusters) = partition_scores(truth, predicted);
    let classes = truth.iter().collect::<std::collections::HashSet<_>>().len();

    // The answered partition: review members alone.
    #[derive(Hash, PartialEq, Eq)]
    enum Answered<'a, P> {
        Cluster(&'a P),
        Alone(usize),
    }
    let answered: Vec<Answered<P>> = predicted
        .iter()
        .zip(review)
        .enumerate()
        .map(|(i, (p, &r))| if r { Answered::Alone(i) } else { Answered::Cluster(p) })
        .collect();
    let mut members: HashMap<&Answered<P>, HashMap<&T, usize>> = HashMap::new();
    for (a, t) in answered.iter().zip(truth) {
        *members.entry(a).or_default().entry(t).or_default() += 1;
    }
    let (mut in_multi, mut wrong) = (0usize, 0usize);
    let pairs = |x: usize| (x * x.saturating_sub(1) / 2) as f64;
    let (mut together, mut together_same) = (0.0, 0.0);
    for counts in members.values() {
        let size: usize = counts.values().sum();
        together += pairs(size);
        together_same += counts.values().map(|&c| pairs(c)).sum::<f64>();
        if size >= 2 {
            in_multi += size;
            wrong += size - counts.values().max().copied().unwrap_or(0);
        }
    }
    let mut per_class: HashMap<&T, usize> = HashMap::new();
    truth.iter().for_each(|t| *per_class.entry(t).or_default() += 1);
    let same: f64 = per_class.values().map(|&c| pairs(c)).sum();
    Scores {
        homogeneity,
        completeness,
        v_measure,
        ari,
        clusters,
        clusters_per_intent: clusters as f64 / classes.max(1) as f64,
        wrong_reply: if in_multi == 0 { 0.0 } else { wrong as f64 / in_multi as f64 },
        pair_precision: if together == 0.0 { 1.0 } else { together_same / together },
        pair_recall: if same == 0.0 { 1.0 } else { together_same / same },
        review: review.iter().filter(|r| **r).count() as f64 / review.len().max(1) as f64,
    }
}

/// The median and range of each score over several runs.
pub struct Summary {
    pub runs: Vec<Scores>,
}

impl Summary {
    pub fn median(&self, field: &str) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(|s| s.get(field)).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    pub fn range(&self, field: &str) -> (f64, f64) {
        let v = self.runs.iter().map(|s| s.get(field));
        (v.clone().fold(f64::INFINITY, f64::min), v.fold(f64::NEG_INFINITY, f64::max))
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |x: f64| 100.0 * x;
        let (v0, v1) = self.range("V");
        let (w0, w1) = self.range("wrong");
        let (r0, r1) = self.range("review");
        write!(
            f,
            "median of {}: V {:.4} ({:.4}-{:.4})  h {:.4}  c {:.4}  ARI {:.4}  wrong {:.2}% ({:.2}-{:.2})  pairP {:.3}  pairR {:.3}  review {:.2}% ({:.2}-{:.2})  clusters {:.0} ({:.2}/intent)",
            self.runs.len(),
            self.median("V"),
            v0,
            v1,
            self.median("h"),
            self.median("c"),
            self.median("ARI"),
            pct(self.median("wrong")),
            pct(w0),
            pct(w1),
            self.median("pairP"),
            self.median("pairR"),
            pct(self.median("review")),
            pct(r0),
            pct(r1),
            self.median("clusters"),
            self.median("per_intent"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn perfect_and_permuted_labels_score_one() {
        let s = score(&[0, 0, 1, 1], &[5, 5, 9, 9]);
        assert!(close(s.homogeneity, 1.0) && close(s.completeness, 1.0) && close(s.ari, 1.0));
        assert!(close(s.wrong_reply, 0.0) && close(s.pair_precision, 1.0) && close(s.pair_recall, 1.0));
    }

    #[test]
    fn matches_hand_computed_values() {
        // truth [0,0,1,1], predicted [0,0,0,1]: H(C) = ln 2, H(K) = 0.562335,
        // H(C|K) = 0.477386, H(K|C) = 0.346574.
        let s = score(&[0, 0, 1, 1], &[0, 0, 0, 1]);
        assert!((s.homogeneity - 0.311_278).abs() < 1e-5, "{s}");
        assert!((s.completeness - 0.383_688).abs() < 1e-5, "{s}");
        assert!((s.v_measure - 0.343_708).abs() < 1e-5, "{s}");
        // truth [0,0,1,1,2,2], predicted [0,0,1,2,2,2]: index 2, expected
        // 3 * 4 / 15 = 0.8, max 3.5, so ARI = 1.2 / 2.7.
        let s = score(&[0, 0, 1, 1, 2, 2], &[0, 0, 1, 2, 2, 2]);
        assert!(close(s.ari, 1.2 / 2.7), "{s}");
        // One cluster for everything: homogeneity 0, completeness 1.
        let s = score(&[0, 1, 2, 3], &[0, 0, 0, 0]);
        assert!(close(s.homogeneity, 0.0) && close(s.completeness, 1.0));
    }

    #[test]
    fn wrong_replies_count_answered_members_only() {
        // Cluster 7: intents a, a, a, b -> one wrong of four; cluster 8: a
        // singleton, outside the rate. Pairs together: 6, of which 3 alike;
        // alike pairs: a has 4 members -> 6.
        let truth = ["a", "a", "a", "b", "a"];
        let s = score(&truth, &[7, 7, 7, 7, 8]);
        assert!(close(s.wrong_reply, 0.25), "{s}");
        assert!(close(s.pair_precision, 0.5) && close(s.pair_recall, 0.5), "{s}");
        assert!(close(s.clusters_per_intent, 1.0));
        // The b member in review: no wrong reply; V still sees it placed.
        let r = score_with_review(&truth, &[7, 7, 7, 7, 8], &[false, false, false, true, false]);
        assert!(close(r.wrong_reply, 0.0) && close(r.review, 0.2), "{r}");
        assert!(close(r.v_measure, s.v_measure));
        assert!(close(r.pair_precision, 1.0) && close(r.pair_recall, 0.5), "{r}");
    }

    #[test]
    fn summaries_take_medians_and_ranges() {
        let runs = [0.2, 0.1, 0.4].map(|w| Scores { wrong_reply: w, ..Scores::default() }).to_vec();
        let s = Summary { runs };
        assert!(close(s.median("wrong"), 0.2));
        assert_eq!(s.range("wrong"), (0.1, 0.4));
    }
}
