//! Command line: what to send, how fast, for how long, and to which daemon
//! (loopback only).

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, bail, ensure};
use awc::http::Uri;
use clap::{ArgGroup, Parser, ValueEnum};

use crate::texts::TextMix;

/// Creators one event WebSocket subscribes to.
pub const CREATORS_PER_EVENT_SOCKET: usize = 50;

/// Drives ingest load against a running clusterd and reports throughput and
/// latencies (ingest ack, and ingest to cluster event).
#[derive(Debug, Parser)]
#[command(version, group(ArgGroup::new("stop").args(["duration", "count"]).required(true).multiple(true)))]
pub struct Args {
    /// What to run: ingest load (the default), reads (list clusters and
    /// cluster detail), or the seed's mix (8 ingests : 2 list clusters); see
    /// `reads`.
    #[arg(long, value_enum, default_value_t = Mode::Ingest)]
    pub mode: Mode,
    /// Read and mix modes: messages posted to each creator before the run
    /// (which then waits until every creator has a cluster to read).
    #[arg(long, default_value_t = 0)]
    pub prefill: u32,
    /// Base URL of the daemon; loopback addresses only.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// How messages are sent: pipelined WebSocket ingest frames, or one
    /// POST /v1/messages at a time per connection.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Concurrent connections sending messages.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub connections: u32,
    /// Total messages per second across all connections; 0 sends flat out.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop sending after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop sending after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Creators the messages are spread over (ids `lt-<run>-<k>`, fresh for
    /// every run, unless --creator-prefix is given).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub creators: u32,
    /// Send to the existing creators `<PREFIX><k>`, k = 0..--creators,
    /// instead of fresh ones: e.g. creators with a long history loaded
    /// beforehand (loadtest/decision_bench.sh uses `dc-`).
    #[arg(long, value_parser = creator_prefix)]
    pub creator_prefix: Option<String>,
    /// Texts: built-in chat questions with random variations, or verbatim.
    #[arg(long, value_enum, default_value_t = TextMix::Mix)]
    pub texts: TextMix,
    /// WebSocket transport: ingest frames in flight per connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub inflight: u32,
    /// Subscribe to every run creator's events and measure ingest-to-event
    /// latency (one extra WebSocket per 50 creators).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub events: bool,
    /// Seconds to wait, after the last ack, for outstanding events.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Seed of the text and creator choices (default: from the run id).
    #[arg(long)]
    pub seed: Option<u64>,
    /// API token (admin, or ingest with --events false), sent as a bearer
    /// token over HTTP and as `?token=` on the WebSocket.
    #[arg(long, env = "CLUSTERD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Append one CSV line `message_id,external_id,creator_id` per
    /// acknowledged message to this file (created if missing), for checks
    /// afterwards (loadtest/crash.sh).
    #[arg(long)]
    pub acked_file: Option<std::path::PathBuf>,
    /// Keep sending through a daemon that goes away: a WebSocket ingest
    /// connection that fails is reopened (retrying until the run ends), and
    /// its unacknowledged frames are counted as errors. HTTP requests always
    /// keep going. Event sockets reconnect in any case.
    #[arg(long)]
    pub keep_going: bool,
    /// Subscribe mode: this many WebSocket subscribers, subscriber k on run
    /// creator k mod --creators, each timing every event from its `at` and
    /// checking its event ids (see loadtest/subscribe.sh).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub subscribers: u32,
    /// Subscribe mode: this many more subscribers (dashboards) on the hot
    /// creator, the first run creator.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub hot_dashboards: u32,
    /// Percent of the messages sent to the hot creator (0: it gets its
    /// uniform share).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_percent: u8,
    /// Subscribe mode: base URL(s) of the daemons the subscribers connect
    /// to, round-robin (repeat the flag); default --url. Loopback only.
    #[arg(long)]
    pub subscribe_url: Vec<String>,
    /// Subscribe mode: a daemon's process id, whose resident memory is read
    /// before and after the subscribers connect (repeat the flag).
    #[arg(long)]
    pub daemon_pid: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Ingest,
    Read,
    Mix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Ws,
    Http,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Http => "http",
        }
    }
}

/// When sending stops: whichever limit is reached first.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub duration: Option<Duration>,
    pub count: Option<u64>,
}

impl Args {
    pub fn limits(&self) -> anyhow::Result<Limits> {
        let duration = self.duration.map(|s| seconds("--duration", s)).transpose()?;
        Ok(Limits { duration, count: self.count })
    }

    pub fn drain(&self) -> anyhow::Result<Duration> {
        ensure!(self.drain.is_finite() && self.drain >= 0.0, "--drain must be a number of seconds >= 0");
        Ok(Duration::from_secs_f64(self.drain))
    }

    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(self.rate.is_finite() && self.rate >= 0.0, "--rate must be >= 0 (0 = flat out)");
        self.limits()?;
        self.drain()?;
        Ok(())
    }

    /// Event sockets needed to cover every creator.
    pub fn event_sockets(&self) -> usize {
        if self.events { (self.creators as usize).div_ceil(CREATORS_PER_EVENT_SOCKET) } else { 0 }
    }
}

/// A prefix that keeps `<prefix><k>` a valid creator id for every k
/// (at most 100 characters of `[A-Za-z0-9_.:-]`).
fn creator_prefix(prefix: &str) -> Result<String, String> {
    if prefix.len() > 100 {
        return Err("at most 100 characters".into());
    }
    clusterd::domain::validate::creator_id(&format!("{prefix}0")).map_err(|e| e.to_string())?;
    Ok(prefix.to_owned())
}

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    ensure!(s.is_finite() && s > 0.0 && s <= 86_400.0, "{flag} must be a number of seconds in (0, 86400]");
    Ok(Duration::from_secs_f64(s))
}

/// The daemon's base URL, checked to be plain HTTP on a loopback address
/// (this machine's policy: load is only ever driven against a local daemon).
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`, no trailing slash.
    pub http: String,
    /// `ws://host:port/v1/ws`.
    pub ws: String,
}

impl Target {
    /// Sends `token` on every WebSocket (`?token=`; tokens are URL-safe).
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        if let Some(token) = token {
            self.ws = format!("{}?token={token}", self.ws);
        }
        self
    }

    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("--url {url:?}: scheme {other:?} is not supported; use http://"),
            None => bail!("--url {url:?}: give a full URL such as http://127.0.0.1:8080"),
        }
        let host = uri.host().with_context(|| format!("--url {url:?} has no host"))?;
        if !is_loopback(host) {
            bail!(
                "--url {url:?}: refusing to load a non-loopback host ({host}); \
                 this tool only targets a daemon on this machine (127.0.0.0/8, ::1, localhost)"
            );
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            bail!("--url {url:?}: give the base URL only (no path or query)");
        }
        let authority = uri.authority().with_context(|| format!("--url {url:?} has no host"))?;
        Ok(Self { http: format!("http://{authority}"), ws: format!("ws://{authority}/v1/ws") })
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        let target = Target::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!((target.http.as_str(), target.ws.as_str()), ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/v1/ws"));
        for ok in ["http://localhost:9000", "http://[::1]:8080", "http://127.1.2.3"] {
            assert!(Target::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.5:8080", "http://example.com", "https://127.0.0.1", "127.0.0.1:8080"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let refused = Target::parse("http://192.168.1.10:8080").unwrap_err().to_string();
        assert!(refused.contains("non-loopback"), "{refused}");
    }

    #[test]
    fn a_stop_condition_is_required() {
        assert!(Args::try_parse_from(["loadtest"]).is_err());
        let args = Args::try_parse_from(["loadtest", "--count", "10", "--events", "false"]).unwrap();
        assert_eq!((args.count, args.events, args.event_sockets()), (Some(10), false, 0));
        let args = Args::try_parse_from(["loadtest", "--duration", "5", "--creators", "101"]).unwrap();
        assert_eq!((args.event_sockets(), args.creator_prefix), (3, None));
        assert!(!args.keep_going && args.acked_file.is_none());
        let args = Args::try_parse_from(["loadtest", "--count", "1", "--keep-going", "--acked-file", "/tmp/acked.csv"])
            .unwrap();
        assert!(args.keep_going && args.mode == Mode::Ingest);
        assert_eq!(args.acked_file.as_deref(), Some(std::path::Path::new("/tmp/acked.csv")));
        let args = Args::try_parse_from(["loadtest", "--mode", "mix", "--creators", "3", "--count", "10"]).unwrap();
        assert_eq!((args.mode, args.creators, args.prefill), (Mode::Mix, 3, 0));
    }

    #[test]
    fn creator_prefixes_must_make_valid_ids() {
        let args = Args::try_parse_from(["loadtest", "--count", "1", "--creator-prefix", "dc-"]).unwrap();
        assert_eq!(args.creator_prefix.as_deref(), Some("dc-"));
        for bad in ["a b", "é", &"x".repeat(101)] {
            assert!(Args::try_parse_from(["loadtest", "--count", "1", "--creator-prefix", bad]).is_err(), "{bad}");
        }
    }
}
