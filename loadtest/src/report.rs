//! Formatting of the progress lines (stderr) and the final report (stdout).

use std::{fmt::Write, time::Duration};

use hdrhistogram::Histogram;

use crate::stats::Stats;

/// One progress line: totals so far and the ack rate over the last tick.
pub fn progress_line(elapsed: Duration, stats: &Stats, ack_rate: f64) -> String {
    format!(
        "[{:>5.1}s] sent {:>8}  acked {:>8}  errors {:>6}  {:>7.0} acks/s  events {:>8}",
        elapsed.as_secs_f64(),
        stats.sent,
        stats.acked,
        stats.errors(),
        ack_rate,
        stats.events(),
    )
}

/// How the run was set up, for the report's first line.
pub struct Setup<'a> {
    pub run_id: &'a str,
    pub description: String,
}

/// The final report. `ingest_time` is from the first send to the last ack;
/// `drain` is how long events were awaited after it.
pub fn final_report(setup: &Setup, stats: &Stats, ingest_time: Duration, drain: Duration, events: bool) -> String {
    let mut out = String::new();
    let secs = ingest_time.as_secs_f64();
    let throughput = if secs > 0.0 { stats.acked as f64 / secs } else { 0.0 };
    let _ = writeln!(out, "run {}: {}", setup.run_id, setup.description);
    let _ = writeln!(out, "sent            {}", stats.sent);
    let _ = writeln!(out, "acked           {} (duplicates {})", stats.acked, stats.duplicates);
    let _ = writeln!(out, "errors          {}", error_summary(stats));
    let _ = writeln!(out, "throughput      {throughput:.0} acks/s ({} acks in {secs:.2} s)", stats.acked);
    let _ = writeln!(out, "ack latency     {}", latency_summary(&stats.ack_latency));
    if events {
        let _ = writeln!(
            out,
            "events          {} (cluster.created {}, cluster.updated {}; reconnects {}, duplicates {}, id gaps {})",
            stats.events(),
            stats.events_created,
            stats.events_updated,
            stats.event_reconnects,
            stats.duplicate_events,
            stats.event_id_gaps,
        );
        let _ = writeln!(out, "ingest-to-event {}", latency_summary(&stats.event_latency));
        let _ = writeln!(
            out,
            "no event        {} of {} new acked messages within {:.1} s after the last ack",
            stats.awaiting_events(),
            stats.acked - stats.duplicates,
            drain.as_secs_f64()
        );
    }
    out
}

/// `0` or `12 (timeout 2, unavailable 10)`.
pub fn error_summary(stats: &Stats) -> String {
    let total = stats.errors();
    if total == 0 {
        return "0".to_owned();
    }
    let codes: Vec<String> = stats.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
    format!("{total} ({})", codes.join(", "))
}

/// `p50 1.234 ms  p95 ...  p99 ...  max ...  (n=...)` from a histogram in µs.
pub fn latency_summary(histogram: &Histogram<u64>) -> String {
    if histogram.is_empty() {
        return "no samples".to_owned();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms  max {:.3} ms  (n={})",
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.95)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
        histogram.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_reports_percentiles_in_ms() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in 1..=1000 {
            histogram.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        assert_eq!(latency_summary(&histogram), "p50 5.003 ms  p95 9.503 ms  p99 9.903 ms  max 10.007 ms  (n=1000)");
        assert_eq!(latency_summary(&Histogram::<u64>::new(3).unwrap()), "no samples");
    }

    #[test]
    fn errors_are_listed_by_code() {
        let mut stats = Stats::new(false);
        assert_eq!(error_summary(&stats), "0");
        stats.on_errors("unavailable", 10);
        stats.on_error("timeout");
        stats.on_error("timeout");
        assert_eq!(error_summary(&stats), "12 (timeout 2, unavailable 10)");
    }
}
