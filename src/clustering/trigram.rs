//! Trigram similarity with pg_trgm's semantics, so that the in-memory
//! decision and `similarity()` in PostgreSQL agree (a test checks them
//! against the real database).
//!
//! pg_trgm lower-cases the text, splits it into words (runs of
//! alphanumeric characters), pads each word with two spaces in front and
//! one behind, and takes every three consecutive characters of it. The
//! similarity of two texts is the number of distinct trigrams they share
//! divided by the number of distinct trigrams of either.

/// The distinct trigrams of a text, sorted: three characters packed in 63
/// bits (21 bits each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trigrams(Vec<u64>);

impl Trigrams {
    pub fn of(text: &str) -> Self {
        let lower = text.to_lowercase();
        let mut grams = Vec::new();
        let mut word: Vec<char> = vec![' ', ' '];
        let mut flush = |word: &mut Vec<char>| {
            if word.len() > 2 {
                word.push(' ');
                grams.extend(word.windows(3).map(|w| pack(w[0], w[1], w[2])));
            }
            word.truncate(2);
        };
        for c in lower.chars() {
            if c.is_alphanumeric() {
                word.push(c);
            } else {
                flush(&mut word);
            }
        }
        flush(&mut word);
        grams.sort_unstable();
        grams.dedup();
        Self(grams)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// pg_trgm's `similarity()`: shared / (|a| + |b| - shared); 0 when either
    /// text has no trigram.
    pub fn similarity(&self, other: &Self) -> f32 {
        if self.0.is_empty() || other.0.is_empty() {
            return 0.0;
        }
        let (mut i, mut j, mut shared) = (0, 0, 0usize);
        while i < self.0.len() && j < other.0.len() {
            match self.0[i].cmp(&other.0[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    shared += 1;
                    i += 1;
                    j += 1;
                }
            }
        }
        shared as f32 / (self.0.len() + other.0.len() - shared) as f32
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<u64>()
    }
}

fn pack(a: char, b: char, c: char) -> u64 {
    (u64::from(a) << 42) | (u64::from(b) << 21) | u64::from(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_padded_like_pg_trgm() {
        // show_trgm('cat') = {"  c"," ca","at ","cat"}
        assert_eq!(Trigrams::of("cat").len(), 4);
        assert_eq!(Trigrams::of("Cat, cat!").len(), 4);
        assert!(Trigrams::of("  ,; ").is_empty());
    }

    #[test]
    fn similarity_matches_known_values() {
        // SELECT similarity('word', 'two words') = 0.36363637
        let s = Trigrams::of("word").similarity(&Trigrams::of("two words"));
        assert!((s - 0.363_636_37).abs() < 1e-6, "{s}");
        assert_eq!(Trigrams::of("same text").similarity(&Trigrams::of("SAME  text")), 1.0);
        assert_eq!(Trigrams::of("").similarity(&Trigrams::of("")), 0.0);
    }
}
