//! Vector arithmetic of embeddings and cluster centroids.
//!
//! A centroid is the mean of its members' embeddings. Cosine similarity
//! ignores its norm, so the mean is kept as is (not re-normalised), which
//! keeps incremental joins and removals exact.

/// L2-normalises `v` in place; a zero vector stays zero.
pub fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

/// The mean of `size` members after `member` joins (`size` counts it).
pub fn centroid_add(centroid: &mut [f32], size_after: usize, member: &[f32]) {
    let n = size_after as f32;
    for (c, m) in centroid.iter_mut().zip(member) {
        *c += (m - *c) / n;
    }
}

/// The mean of the members left after `member` leaves (`size_after` >= 1).
pub fn centroid_remove(centroid: &mut [f32], size_after: usize, member: &[f32]) {
    let n = size_after as f32;
    for (c, m) in centroid.iter_mut().zip(member) {
        *c = (*c * (n + 1.0) - m) / n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn incremental_mean_matches_batch_mean() {
        let members = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 3.0, 1.0]];
        let mut c = members[0].to_vec();
        centroid_add(&mut c, 2, &members[1]);
        centroid_add(&mut c, 3, &members[2]);
        assert!(close(&c, &[4.0 / 3.0, 4.0 / 3.0, 1.0]));
        centroid_remove(&mut c, 2, &members[1]);
        assert!(close(&c, &[2.0, 1.5, 1.5]));
    }

    #[test]
    fn cosine_and_normalise() {
        let mut v = vec![3.0, 4.0];
        normalise(&mut v);
        assert!(close(&v, &[0.6, 0.8]));
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
