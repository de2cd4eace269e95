//! What the load test says: short chat questions that visitors send to a
//! creator, varied (case, punctuation, typos, greetings, suffixes) so that
//! the clustering pipeline has real work: some texts match exactly, some
//! only by trigram similarity, some only by embedding.

use clap::ValueEnum;

/// The questions every variation starts from.
pub const QUESTIONS: &[&str] = &[
    "how much are the tickets?",
    "what's the price of the hoodie?",
    "when is the next live stream?",
    "when does the tour start?",
    "are there tickets left for berlin?",
    "can i get a refund for my order?",
    "my order hasn't arrived yet",
    "do you ship to canada?",
    "how long does shipping take?",
    "is the merch restocking soon?",
    "what size should i get for the t-shirt?",
    "will there be a vip meet and greet?",
    "what time do doors open?",
    "is the concert all ages?",
    "can i change the name on my ticket?",
    "where can i buy the vinyl?",
    "when is the new album coming out?",
    "is there a discount code?",
    "do you accept paypal?",
    "how do i cancel my subscription?",
    "why was i charged twice?",
    "when will the recording be posted?",
    "what camera do you use?",
    "what's the song in your last video?",
    "will you collab with other artists?",
    "how do i join the discord?",
    "what mic do you use?",
    "can you say hi to my sister?",
    "is the giveaway still open?",
    "who won the giveaway?",
    "are you coming to london?",
    "will you add more dates in spain?",
    "how much is the membership?",
    "what do i get with the premium tier?",
    "can i pay in installments?",
    "my download link doesn't work",
    "i never got my confirmation email",
    "is the stream cancelled today?",
    "what game are you playing next?",
    "what's your setup?",
    "can i get a signed copy?",
    "how much for a shoutout?",
    "do you take custom commissions?",
    "is the course still on sale?",
    "when does the sale end?",
    "can i upgrade my ticket?",
    "is there parking at the venue?",
    "what's the refund policy?",
    "how do i reset my password?",
    "can i transfer my ticket to a friend?",
    "where is my tracking number?",
    "are the hoodies unisex?",
];

const GREETINGS: &[&str] = &["hey ", "hi! ", "hello, ", "quick question: ", "omg ", "yo "];
const SUFFIXES: &[&str] = &[" pls", " thanks!", " 🙏", " asap", " lol", " ❤️", " x", " :)"];

/// How texts are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TextMix {
    /// Built-in questions with random variations (typos, case, punctuation...).
    Mix,
    /// Built-in questions verbatim: clustering mostly by exact text match.
    Exact,
    /// Variations made unique by an order number, so that no cache helps:
    /// every message costs the embedding model a forward pass.
    Unique,
}

/// The next text to send.
pub fn text(mix: TextMix, rng: &mut Rng) -> String {
    let question = rng.pick(QUESTIONS);
    match mix {
        TextMix::Mix => vary(question, rng),
        TextMix::Exact => (*question).to_owned(),
        TextMix::Unique => format!("{} order {}", vary(question, rng), rng.next_u64() % 1_000_000_000),
    }
}

/// A realistic variation of `question`: the same `rng` state always gives
/// the same variation.
pub fn vary(question: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = question.chars().collect();
    if rng.percent(25) {
        typo(&mut chars, rng);
    }
    let mut text = punctuate(recase(chars.into_iter().collect(), rng), rng);
    if rng.percent(15) {
        let greeting = rng.pick(GREETINGS);
        text.insert_str(0, greeting);
    }
    if rng.percent(20) {
        let suffix = rng.pick(SUFFIXES);
        text.push_str(suffix);
    }
    text
}

/// Swaps, drops or doubles one letter.
fn typo(chars: &mut Vec<char>, rng: &mut Rng) {
    let letters: Vec<usize> = (0..chars.len()).filter(|&i| chars[i].is_alphabetic()).collect();
    if letters.len() < 2 {
        return;
    }
    let at = *rng.pick(&letters);
    match rng.below(3) {
        0 if at + 1 < chars.len() => chars.swap(at, at + 1),
        1 => {
            chars.remove(at);
        }
        _ => chars.insert(at, chars[at]),
    }
}

fn recase(text: String, rng: &mut Rng) -> String {
    match rng.below(20) {
        0..=9 => text,
        10..=17 => capitalise(&text),
        _ => text.to_uppercase(),
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Replaces the final `?` (if any) with another ending.
fn punctuate(text: String, rng: &mut Rng) -> String {
    let stem = text.trim_end_matches('?');
    let ending = match rng.below(10) {
        0..=4 => return text,
        5 | 6 => "",
        7 => "??",
        8 => "?!",
        _ => " ???",
    };
    format!("{stem}{ending}")
}

/// xorshift64* seeded through splitmix64: tiny and deterministic, plenty for
/// choosing texts and creators (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 spreads nearby seeds apart and never yields the
        // all-zero state that xorshift cannot leave.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is negligible here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p`%.
    pub fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64, n: usize) -> Vec<String> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| text(TextMix::Mix, &mut rng)).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_texts() {
        assert_eq!(sample(42, 200), sample(42, 200));
        assert_ne!(sample(42, 200), sample(43, 200));
    }

    #[test]
    fn variations_are_varied_but_valid() {
        let texts = sample(7, 2000);
        let verbatim = texts.iter().filter(|t| QUESTIONS.contains(&t.as_str())).count();
        assert!(verbatim > 100 && verbatim < 600, "{verbatim} of 2000 verbatim");
        let distinct: std::collections::HashSet<_> = texts.iter().collect();
        assert!(distinct.len() > 500, "only {} distinct texts", distinct.len());
        assert!(texts.iter().all(|t| !t.trim().is_empty() && t.chars().count() <= 200));
    }

    #[test]
    fn exact_texts_are_the_questions() {
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| QUESTIONS.contains(&text(TextMix::Exact, &mut rng).as_str())));
    }

    #[test]
    fn typos_change_one_letter_at_most() {
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let mut chars: Vec<char> = "what mic do you use?".chars().collect();
            typo(&mut chars, &mut rng);
            assert!(chars.len().abs_diff(20) <= 1, "{}", chars.iter().collect::<String>());
        }
    }
}
