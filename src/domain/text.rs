//! Text normalisation: what makes two messages "the same text".

use sha2::{Digest, Sha256};

/// Lower-cases, trims, and collapses every run of whitespace to one space,
/// so that "How much?" and "  how   MUCH? " compare equal.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// SHA-256 of the normalised text: the key of exact-duplicate matching.
pub fn norm_key(text: &str) -> [u8; 32] {
    Sha256::digest(normalise(text).as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_folds_case_and_whitespace() {
        assert_eq!(normalise("  How   MUCH?\n\t"), "how much?");
        assert_eq!(normalise("Ünïcode  ÉTÉ"), "ünïcode été");
        assert_eq!(normalise(""), "");
    }

    #[test]
    fn norm_key_equal_for_equivalent_texts() {
        assert_eq!(norm_key("How much?"), norm_key(" how  much? "));
        assert_ne!(norm_key("How much?"), norm_key("How much"));
    }
}
