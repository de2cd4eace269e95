//! State shared by the tasks of one run: who the messages are for, how
//! many may still be sent, and the recorder.

use std::{
    cell::{Cell, RefCell},
    fs::File,
    io::{BufWriter, Write},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;

use clusterd::protocol::{MessageInput, Visitor};
use tokio::{sync::Notify, time::Instant};

use crate::{
    cli::Limits,
    stats::Stats,
    texts::{self, Rng, TextMix},
};

pub struct Run {
    /// Short random id naming this run's creators and external ids.
    pub id: String,
    pub creators: Vec<String>,
    pub seed: u64,
    pub mix: TextMix,
    pub plan: Plan,
    pub stats: RefCell<Stats>,
    /// Signalled when an event settles the last acked message awaiting one.
    pub settled: Notify,
    /// `--acked-file`: one line per acknowledged message.
    acked_log: Option<RefCell<AckedLog>>,
    /// `--hot-percent`: the share of messages for the first creator.
    hot_percent: usize,
}

/// The `--acked-file` writer; remembers its first error for the end of the
/// run (a check that reads an incomplete file would report false losses).
struct AckedLog {
    out: BufWriter<File>,
    error: Option<std::io::Error>,
}

impl Run {
    /// Creators are `<prefix><k>` when `prefix` is given (existing
    /// creators), else fresh ones: `lt-<run>-<k>`.
    pub fn new(
        creators: u32,
        prefix: Option<&str>,
        seed: Option<u64>,
        mix: TextMix,
        limits: Limits,
        track_events: bool,
    ) -> Self {
        let id = run_id();
        let seed = seed.unwrap_or_else(|| u64::from_str_radix(&id, 16).expect("the run id is hex"));
        let prefix = prefix.map_or_else(|| format!("lt-{id}-"), str::to_owned);
        Self {
            creators: (0..creators).map(|k| format!("{prefix}{k}")).collect(),
            id,
            seed,
            mix,
            plan: Plan::new(limits),
            stats: RefCell::new(Stats::new(track_events)),
            settled: Notify::new(),
            acked_log: None,
            hot_percent: 0,
        }
    }

    /// Sends `percent` % of the messages to the first creator, the hot one,
    /// and the rest uniformly over all.
    pub fn with_hot_percent(mut self, percent: u8) -> Self {
        self.hot_percent = usize::from(percent);
        self
    }

    /// Appends every acknowledged message to `path` (`--acked-file`).
    pub fn with_acked_file(mut self, path: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open --acked-file {}", path.display()))?;
        self.acked_log = Some(RefCell::new(AckedLog { out: BufWriter::new(file), error: None }));
        Ok(self)
    }

    /// Whether acknowledgements are written to an `--acked-file`.
    pub fn logs_acks(&self) -> bool {
        self.acked_log.is_some()
    }

    /// Records an acknowledgement of `message` in the `--acked-file`.
    pub fn log_ack(&self, message_id: uuid::Uuid, message: &MessageInput) {
        let Some(log) = &self.acked_log else { return };
        let mut log = log.borrow_mut();
        let external_id = message.external_id.as_deref().unwrap_or("");
        if let Err(e) = writeln!(log.out, "{message_id},{external_id},{}", message.creator_id) {
            log.error.get_or_insert(e);
        }
    }

    /// Flushes the `--acked-file`; fails if any line could not be written.
    pub fn finish_acked_file(&self) -> anyhow::Result<()> {
        let Some(log) = &self.acked_log else { return Ok(()) };
        let mut log = log.borrow_mut();
        if let Err(e) = log.out.flush() {
            log.error.get_or_insert(e);
        }
        match log.error.take() {
            Some(e) => Err(e).context("writing --acked-file"),
            None => Ok(()),
        }
    }

    /// The RNG of connection `conn`: runs with the same seed send the same
    /// texts to the same creators.
    pub fn rng(&self, conn: usize) -> Rng {
        Rng::new(self.seed ^ (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Message number `seq`: a text for a random creator, with an
    /// `external_id` (as integrations send) and a visitor.
    pub fn message(&self, seq: u64, rng: &mut Rng) -> MessageInput {
        let hot = self.hot_percent > 0 && rng.percent(self.hot_percent);
        let creator = if hot { self.creators[0].clone() } else { rng.pick(&self.creators).clone() };
        let visitor = Visitor { id: Some(format!("v{}", rng.below(10_000))), ..Visitor::default() };
        MessageInput {
            creator_id: creator,
            text: texts::text(self.mix, rng),
            external_id: Some(format!("lt-{}-{seq}", self.id)),
            visitor: Some(visitor),
            raw_payload: None,
            sent_at: None,
        }
    }

    /// Records an event and wakes the drain if nothing awaits one anymore.
    pub fn on_event(&self, message_id: uuid::Uuid, created: bool) {
        let mut stats = self.stats.borrow_mut();
        stats.on_event(message_id, created);
        if stats.awaiting_events() == 0 {
            self.settled.notify_one();
        }
    }
}

/// 8 hex digits from the clock: distinct across runs, so that runs never
/// share creators or external ids.
fn run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
    format!("{:08x}", Rng::new(nanos).next_u64() as u32)
}

/// Hands out message numbers until the count or the deadline is reached.
pub struct Plan {
    limits: Limits,
    started: Cell<Option<Instant>>,
    claimed: Cell<u64>,
}

impl Plan {
    fn new(limits: Limits) -> Self {
        Self { limits, started: Cell::new(None), claimed: Cell::new(0) }
    }

    /// Starts the clock of `--duration`.
    pub fn start(&self) -> Instant {
        let now = Instant::now();
        self.started.set(Some(now));
        now
    }

    /// The next message number, or `None` once sending must stop.
    pub fn claim(&self) -> Option<u64> {
        if self.exhausted() {
            return None;
        }
        let seq = self.claimed.get();
        self.claimed.set(seq + 1);
        Some(seq)
    }

    /// Whether sending must stop (the count or the deadline is reached).
    pub fn exhausted(&self) -> bool {
        let counted_out = self.limits.count.is_some_and(|count| self.claimed.get() >= count);
        let timed_out = match (self.limits.duration, self.started.get()) {
            (Some(duration), Some(started)) => started.elapsed() >= duration,
            _ => false,
        };
        counted_out || timed_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_stops_at_its_count() {
        let run = Run::new(3, None, Some(1), TextMix::Mix, Limits { duration: None, count: Some(3) }, false);
        run.plan.start();
        let claimed: Vec<_> = std::iter::from_fn(|| run.plan.claim()).collect();
        assert_eq!(claimed, [0, 1, 2]);
        assert_eq!(run.creators.len(), 3);
        assert!(run.creators[2].starts_with("lt-") && run.creators[2].ends_with("-2"));
        let run = Run::new(3, Some("dc-"), Some(1), TextMix::Mix, Limits { duration: None, count: Some(3) }, false);
        assert_eq!(run.creators, ["dc-0", "dc-1", "dc-2"]);
    }

    #[test]
    fn messages_follow_the_seed() {
        let limits = Limits { duration: None, count: Some(1) };
        let (a, b) = (
            Run::new(10, None, Some(9), TextMix::Mix, limits, false),
            Run::new(10, None, Some(9), TextMix::Mix, limits, false),
        );
        let (mut ra, mut rb) = (a.rng(0), b.rng(0));
        for seq in 0..50 {
            let (ma, mb) = (a.message(seq, &mut ra), b.message(seq, &mut rb));
            assert_eq!(ma.text, mb.text);
            assert_eq!(ma.creator_id.rsplit('-').next(), mb.creator_id.rsplit('-').next());
        }
    }
}
