//! External clustering scores against true labels: homogeneity,
//! completeness, V-measure (Rosenberg and Hirschberg, 2007) and the
//! adjusted Rand index (Hubert and Arabie, 1985), as scikit-learn defines
//! them.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub homogeneity: f64,
    pub completeness: f64,
    pub v_measure: f64,
    pub ari: f64,
    pub clusters: usize,
}

impl std::fmt::Display for Scores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "h {:.4}  c {:.4}  V {:.4}  ARI {:.4}  clusters {}",
            self.homogeneity, self.completeness, self.v_measure, self.ari, self.clusters
        )
    }
}

/// Scores `predicted` (any ids) against `truth` (any ids), item by item.
pub fn score<T: std::hash::Hash + Eq, P: std::hash::Hash + Eq>(truth: &[T], predicted: &[P]) -> Scores {
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
    Scores { homogeneity, completeness, v_measure, ari, clusters: clusters.len() }
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
}
