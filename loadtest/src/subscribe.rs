//! The subscribe mode (`--subscribers N`): N WebSocket subscribers, each on
//! one run creator (subscriber k on creator k mod `--creators`), plus
//! `--hot-dashboards H` more on the hot creator (the first run creator),
//! spread round-robin over one or more daemons (`--subscribe-url`, else
//! `--url`), connected before the ingest stream starts.
//!
//! Every delivered event is timed from its `at` to its arrival here, on
//! the same machine's clock: `at` is stamped by the instance that made the
//! decision inside its transaction, just before the commit, so this is an
//! upper bound of commit to delivery (it includes the rest of the
//! transaction and its commit). Each subscriber checks its creator's event
//! ids (gapless per creator): one above the next expected is a gap, one at
//! or below the last seen a duplicate. A subscriber the server closes (1013,
//! too slow) reconnects and resumes with `since`, counted by close code.
//!
//! `--daemon-pid` reads the daemon's resident memory (`VmRSS` in
//! `/proc/<pid>/status`) before and after the subscribers connect, before
//! any event: the memory of an idle subscribed connection.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap},
    rc::Rc,
    time::Duration,
};

use actix_web::rt::{self, task::JoinHandle};
use anyhow::{Context, bail};
use awc::ws;
use chrono::{DateTime, Utc};
use clusterd::protocol::ClientFrame;
use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::time::Instant;

use crate::socket::{self, Socket};

/// Subscribers connecting at the same time.
const CONNECTING: usize = 64;
/// Time allowed for one subscriber to connect and be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before a dropped subscriber reconnects.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Highest latency resolved (1 minute, in µs).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Who subscribes, where.
pub struct Fleet {
    /// `(creator, WebSocket URL)` per subscriber.
    plan: Vec<(Rc<str>, Rc<str>)>,
    pub stats: Rc<RefCell<Deliveries>>,
    /// The last event id each subscriber has, by subscriber.
    positions: Rc<Vec<Cell<i64>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the subscribers received.
pub struct Deliveries {
    /// From an event's `at` to its arrival, in µs.
    pub latency: Histogram<u64>,
    pub events: u64,
    pub gaps: u64,
    pub duplicates: u64,
    /// Reconnects by the reason the connection ended (`1013 ...`).
    pub drops: BTreeMap<String, u64>,
    pub last_delivery: Option<Instant>,
}

impl Fleet {
    /// `subscribers` spread over `creators`, then `hot` more on the first
    /// creator; round-robin over `urls`.
    pub fn plan(creators: &[String], subscribers: usize, hot: usize, urls: &[String]) -> Self {
        let urls: Vec<Rc<str>> = urls.iter().map(|u| Rc::from(u.as_str())).collect();
        let names: Vec<Rc<str>> = creators.iter().map(|c| Rc::from(c.as_str())).collect();
        let plan: Vec<(Rc<str>, Rc<str>)> = (0..subscribers + hot)
            .map(|k| {
                let creator = if k < subscribers { &names[k % names.len()] } else { &names[0] };
                (creator.clone(), urls[k % urls.len()].clone())
            })
            .collect();
        let positions = Rc::new((0..plan.len()).map(|_| Cell::new(0)).collect());
        let stats = Rc::new(RefCell::new(Deliveries {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds"),
            events: 0,
            gaps: 0,
            duplicates: 0,
            drops: BTreeMap::new(),
            last_delivery: None,
        }));
        Self { plan, stats, positions, tasks: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.plan.len()
    }

    /// Connects and subscribes every subscriber, [`CONNECTING`] at a time;
    /// each listens from its confirmation on.
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        let connecting = self.plan.iter().enumerate().map(|(index, (creator, url))| {
            let subscriber = Subscriber {
                index,
                creator: creator.clone(),
                url: url.clone(),
                stats: self.stats.clone(),
                positions: self.positions.clone(),
            };
            async move {
                let socket = subscriber.subscribe(None).await?;
                Ok::<_, anyhow::Error>(rt::spawn(subscriber.listen(socket)))
            }
        });
        let mut connected = stream::iter(connecting).buffer_unordered(CONNECTING);
        while let Some(task) = connected.next().await {
            self.tasks.push(task?);
        }
        Ok(())
    }

    /// Events some subscriber of a creator has and another of the same
    /// creator has not, summed over subscribers.
    pub fn behind(&self) -> u64 {
        let mut newest: HashMap<&str, i64> = HashMap::new();
        for ((creator, _), position) in self.plan.iter().zip(self.positions.iter()) {
            let n = newest.entry(creator).or_default();
            *n = (*n).max(position.get());
        }
        self.plan
            .iter()
            .zip(self.positions.iter())
            .map(|((creator, _), position)| (newest[&**creator] - position.get()).unsigned_abs())
            .sum()
    }

    /// Waits until no event has arrived for `quiet` and no subscriber is
    /// behind another of its creator, or until `deadline`.
    pub async fn settle(&self, quiet: Duration, deadline: Instant) {
        loop {
            let now = Instant::now();
            let last = self.stats.borrow().last_delivery;
            if (last.is_none_or(|at| now - at >= quiet) && self.behind() == 0) || now >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The report's subscriber lines.
    pub fn report(&self) -> String {
        let stats = self.stats.borrow();
        let drops: Vec<String> = stats.drops.iter().map(|(why, n)| format!("{n} x {why}")).collect();
        let creators: std::collections::HashSet<&str> = self.plan.iter().map(|(c, _)| &**c).collect();
        format!(
            "deliveries      {} to {} subscribers of {} creators (gaps {}, duplicates {}, behind at the end {}; \
             reconnects {}{})\ncommit-to-delivery {}\n",
            stats.events,
            self.plan.len(),
            creators.len(),
            stats.gaps,
            stats.duplicates,
            self.behind(),
            stats.drops.values().sum::<u64>(),
            if drops.is_empty() { String::new() } else { format!(": {}", drops.join(", ")) },
            crate::report::latency_summary(&stats.latency),
        )
    }

    pub fn stop(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

struct Subscriber {
    index: usize,
    creator: Rc<str>,
    url: Rc<str>,
    stats: Rc<RefCell<Deliveries>>,
    positions: Rc<Vec<Cell<i64>>>,
}

/// The fields of a server frame this mode reads; the rest is skipped
/// unparsed.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    event_id: Option<i64>,
    last_event_id: Option<i64>,
    at: Option<DateTime<Utc>>,
    error: Option<serde_json::Value>,
}

impl Subscriber {
    /// A socket subscribed to the creator (from `since`), confirmed.
    async fn subscribe(&self, since: Option<i64>) -> anyhow::Result<Socket> {
        let mut socket = socket::connect(&self.url).await?;
        let frame = ClientFrame::Subscribe { id: None, creator_id: self.creator.to_string(), since };
        socket::send_text(&mut socket, serde_json::to_string(&frame)?).await?;
        let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
        loop {
            let frame =
                tokio::time::timeout_at(deadline, socket.next()).await.context("subscription not confirmed in time")?;
            if let Some(last_event_id) = self.on_frame(&mut socket, frame).await? {
                if since.is_none() {
                    self.positions[self.index].set(last_event_id);
                }
                return Ok(socket);
            }
        }
    }

    /// Receives until aborted, resuming with `since` whenever dropped.
    async fn listen(self, mut socket: Socket) {
        loop {
            let why = loop {
                let frame = socket.next().await;
                if let Err(e) = self.on_frame(&mut socket, frame).await {
                    break format!("{e:#}");
                }
            };
            *self.stats.borrow_mut().drops.entry(why).or_default() += 1;
            socket = loop {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                match self.subscribe(Some(self.positions[self.index].get())).await {
                    Ok(socket) => break socket,
                    Err(e) => eprintln!("loadtest: subscriber {}: {e:#}", self.index),
                }
            };
        }
    }

    /// Handles one frame; returns `last_event_id` of a confirmation.
    async fn on_frame(
        &self,
        socket: &mut Socket,
        frame: Option<Result<ws::Frame, awc::error::WsProtocolError>>,
    ) -> anyhow::Result<Option<i64>> {
        match frame.context("connection closed")?.context("WebSocket protocol error")? {
            ws::Frame::Text(bytes) => self.on_text(&bytes),
            ws::Frame::Ping(payload) => socket::pong(socket, payload).await.map(|()| None),
            ws::Frame::Pong(_) => Ok(None),
            ws::Frame::Close(reason) => bail!("closed {}", socket::describe_close(reason.as_ref())),
            other => bail!("unexpected frame: {other:?}"),
        }
    }

    fn on_text(&self, bytes: &[u8]) -> anyhow::Result<Option<i64>> {
        let frame: Frame =
            serde_json::from_slice(bytes).with_context(|| format!("bad frame: {}", String::from_utf8_lossy(bytes)))?;
        match (frame.kind, frame.event_id, frame.at) {
            ("event", Some(event_id), Some(at)) => {
                let arrived = Utc::now();
                let position = &self.positions[self.index];
                let mut stats = self.stats.borrow_mut();
                stats.events += 1;
                stats.last_delivery = Some(Instant::now());
                let micros = (arrived - at).num_microseconds().unwrap_or(i64::MAX).max(1);
                stats.latency.saturating_record(micros.unsigned_abs());
                if event_id <= position.get() {
                    stats.duplicates += 1;
                } else {
                    if event_id > position.get() + 1 {
                        stats.gaps += 1;
                    }
                    position.set(event_id);
                }
                Ok(None)
            }
            ("subscribed", _, _) => Ok(Some(frame.last_event_id.context("subscribed without last_event_id")?)),
            ("error", _, _) => bail!("error frame: {}", frame.error.unwrap_or_default()),
            _ => Ok(None),
        }
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("--daemon-pid {pid}: cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_spread_over_creators_and_urls_with_the_hot_ones_last() {
        let creators: Vec<String> = (0..3).map(|k| format!("c{k}")).collect();
        let urls = ["ws://a".to_owned(), "ws://b".to_owned()];
        let fleet = Fleet::plan(&creators, 4, 2, &urls);
        let plan: Vec<(&str, &str)> = fleet.plan.iter().map(|(c, u)| (&**c, &**u)).collect();
        assert_eq!(
            plan,
            [
                ("c0", "ws://a"),
                ("c1", "ws://b"),
                ("c2", "ws://a"),
                ("c0", "ws://b"),
                ("c0", "ws://a"),
                ("c0", "ws://b")
            ]
        );
        assert_eq!(fleet.behind(), 0);
        fleet.positions[0].set(5); // c0: one subscriber at 5, three at 0
        fleet.positions[1].set(2); // c1 alone: never behind itself
        assert_eq!(fleet.behind(), 15);
    }

    #[test]
    fn event_ids_count_gaps_and_duplicates() {
        let fleet = Fleet::plan(&["c".to_owned()], 1, 0, &["ws://a".to_owned()]);
        let subscriber = Subscriber {
            index: 0,
            creator: "c".into(),
            url: "ws://a".into(),
            stats: fleet.stats.clone(),
            positions: fleet.positions.clone(),
        };
        let confirmed = subscriber.on_text(br#"{"type":"subscribed","creator_id":"c","last_event_id":0}"#).unwrap();
        assert_eq!(confirmed, Some(0));
        let at = Utc::now().to_rfc3339();
        for id in [1, 2, 2, 5, 4, 6] {
            let frame =
                format!(r#"{{"type":"event","event_id":{id},"creator_id":"c","cluster":{{"x":[1]}},"at":"{at}"}}"#);
            assert_eq!(subscriber.on_text(frame.as_bytes()).unwrap(), None);
        }
        let stats = fleet.stats.borrow();
        assert_eq!((stats.events, stats.gaps, stats.duplicates), (6, 1, 2));
        assert_eq!(fleet.positions[0].get(), 6);
        assert_eq!(stats.latency.len(), 6);
        assert!(subscriber.on_text(br#"{"type":"error","error":{"code":"forbidden"}}"#).is_err());
    }

    #[test]
    fn resident_memory_is_read_from_proc() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(rss_kib(u32::MAX).is_err());
    }
}
