//! Per-connection pacing for `--rate`: a schedule of evenly spaced send
//! slots. A connection that falls behind (the daemon is slower than the
//! rate) may catch up by at most [`MAX_BURST`] slots at once, so a stall
//! does not turn into an unbounded burst.

use std::time::Duration;

use tokio::time::Instant;

/// Most overdue slots a connection may use back to back.
const MAX_BURST: u32 = 16;

#[derive(Debug)]
pub struct Pacer {
    /// Time between two sends; `None` sends flat out.
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    /// `rate` messages per second; 0 (or less) means unpaced.
    pub fn new(rate: f64) -> Self {
        let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
        Self { interval, next: Instant::now() }
    }

    /// Waits for the next send slot. Cancel-safe: the slot is only taken
    /// once the wait completes.
    pub async fn ready(&mut self) {
        let Some(interval) = self.interval else { return };
        tokio::time::sleep_until(self.next).await;
        let earliest = Instant::now().checked_sub(interval * MAX_BURST).unwrap_or(self.next);
        self.next = self.next.max(earliest) + interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_evenly_and_bounds_catch_up() {
        let start = Instant::now();
        let mut pacer = Pacer::new(100.0);
        for _ in 0..10 {
            pacer.ready().await;
        }
        // Slots at 0, 10, ..., 90 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(90));

        // A one-second stall buys at most MAX_BURST immediate slots.
        tokio::time::advance(Duration::from_secs(1)).await;
        let stalled = Instant::now();
        for _ in 0..MAX_BURST {
            pacer.ready().await;
        }
        assert!(stalled.elapsed() <= Duration::from_millis(10), "{:?}", stalled.elapsed());
        pacer.ready().await;
        pacer.ready().await;
        assert!(stalled.elapsed() >= Duration::from_millis(10));
    }

    #[tokio::test]
    async fn unpaced_never_waits() {
        let mut pacer = Pacer::new(0.0);
        let start = Instant::now();
        for _ in 0..1000 {
            pacer.ready().await;
        }
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}
