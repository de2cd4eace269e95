//! `loadtest`: drives ingest load against a running `clusterd` and reports
//! ack throughput, ack latency and ingest-to-event latency.
//!
//! ```text
//! cargo run --release -p loadtest -- --duration 20                       # WS, 8 connections, flat out
//! cargo run --release -p loadtest -- --transport http --connections 32 --duration 20
//! cargo run --release -p loadtest -- --rate 500 --duration 20            # paced: 500 msg/s in total
//! cargo run --release -p loadtest -- --mode read --connections 8 --duration 20   # list + detail
//! cargo run --release -p loadtest -- --mode mix --creators 3 --duration 20       # 8 ingests : 2 lists
//! ```
//!
//! `loadtest/bench.sh [args]` runs one such test against a fresh daemon on a
//! fresh database and adds the daemon's metrics and a CPU breakdown; see
//! BENCHMARKS.md.
//!
//! A run sends short chat questions (see [`texts`]) to `--creators` fresh
//! creators (`lt-<run>-<k>`; or existing ones, `<prefix><k>`, with
//! `--creator-prefix`), over pipelined WebSocket `ingest` frames or
//! sequential `POST /v1/messages`, until `--duration` or `--count` is
//! reached. With `--events` (the default) it first subscribes to every run
//! creator and times each message from its send to its `cluster.created` /
//! `cluster.updated` event. Progress goes to stderr once a second; the
//! report goes to stdout. Only loopback targets are accepted.
//!
//! For fault tests (`loadtest/crash.sh`), `--acked-file` lists every
//! acknowledged message and `--keep-going` rides through a daemon that
//! dies and comes back: what was not acknowledged is counted, not retried.
//!
//! Everything runs on actix's single-threaded runtime: the tool uses at
//! most one core, which matters on a small machine shared with the daemon.

mod cli;
mod events;
mod http_ingest;
mod pacer;
mod reads;
mod report;
mod run;
mod socket;
mod stats;
mod subscribe;
mod texts;
mod ws_ingest;

use std::{fmt::Write, process::ExitCode, rc::Rc, time::Duration};

use actix_web::rt::{self, task::JoinHandle};
use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::future::join_all;
use tokio::time::Instant;

use crate::{
    cli::{Args, CREATORS_PER_EVENT_SOCKET, Mode, Target, Transport},
    events::Subscriber,
    report::Setup,
    run::Run,
};

#[actix_web::main]
async fn main() -> ExitCode {
    match execute(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(args: Args) -> anyhow::Result<()> {
    args.check()?;
    let target = Target::parse(&args.url)?.with_token(args.token.as_deref());
    let drain = args.drain()?;
    check_ready(&target).await?;
    if args.mode != Mode::Ingest {
        return reads::execute(args, target).await;
    }

    let mut run =
        Run::new(args.creators, args.creator_prefix.as_deref(), args.seed, args.texts, args.limits()?, args.events)
            .with_hot_percent(args.hot_percent);
    if let Some(path) = &args.acked_file {
        run = run.with_acked_file(path)?;
    }
    let run = Rc::new(run);
    let setup = Setup { run_id: &run.id, description: describe(&args, &target, run.seed) };
    eprintln!("loadtest: run {}: {}", setup.run_id, setup.description);

    let listeners = subscribe(&run, &target).await?;
    let fleet = match args.subscribers + args.hot_dashboards {
        0 => None,
        _ => Some(connect_fleet(&args, &run).await?),
    };
    let senders = Senders::connect(&args, &target).await?;
    let started = run.plan.start();
    let progress = rt::spawn(progress(run.clone(), started));
    join_all(senders.spawn(&run)).await;
    let ingest_end = run.stats.borrow().last_ack.unwrap_or_else(Instant::now);
    if args.events {
        drain_events(&run, ingest_end + drain).await;
    }
    if let Some((fleet, _)) = &fleet {
        fleet.settle(FLEET_QUIET, Instant::now() + drain).await;
        fleet.stop();
    }
    progress.abort();
    listeners.iter().for_each(JoinHandle::abort);

    run.finish_acked_file()?;
    let stats = run.stats.borrow();
    let ingest_time = ingest_end.saturating_duration_since(started);
    print!("{}", report::final_report(&setup, &stats, ingest_time, drain, args.events));
    if let Some((fleet, memory)) = &fleet {
        print!("{memory}{}", fleet.report());
    }
    if stats.acked == 0 {
        bail!("no message was acknowledged");
    }
    Ok(())
}

/// How long the subscribers must have been quiet, after the ingest, for
/// the run to end before `--drain`.
const FLEET_QUIET: Duration = Duration::from_secs(2);

/// Connects the subscribe mode's subscribers; returns them and the lines
/// on the daemons' memory per idle connection.
async fn connect_fleet(args: &Args, run: &Run) -> anyhow::Result<(subscribe::Fleet, String)> {
    let bases = if args.subscribe_url.is_empty() { std::slice::from_ref(&args.url) } else { &args.subscribe_url };
    let mut urls = Vec::with_capacity(bases.len());
    for base in bases {
        let target = Target::parse(base)?.with_token(args.token.as_deref());
        check_ready(&target).await?;
        urls.push(target.ws);
    }
    let mut fleet =
        subscribe::Fleet::plan(&run.creators, args.subscribers as usize, args.hot_dashboards as usize, &urls);
    let before: Vec<u64> = args.daemon_pid.iter().map(|&pid| subscribe::rss_kib(pid)).collect::<Result<_, _>>()?;
    let started = Instant::now();
    fleet.connect().await?;
    let took = started.elapsed();
    eprintln!("loadtest: {} subscribers connected in {:.1} s", fleet.len(), took.as_secs_f64());
    // Let the daemons' allocators and the sessions' first heartbeat settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut memory = format!("subscribers     {} connected in {:.1} s\n", fleet.len(), took.as_secs_f64());
    for (&pid, before) in args.daemon_pid.iter().zip(before) {
        let after = subscribe::rss_kib(pid)?;
        let per = after.saturating_sub(before) as f64 * 1024.0 / fleet.len() as f64;
        let _ = writeln!(
            memory,
            "idle memory     pid {pid}: RSS {:.1} MiB -> {:.1} MiB, {:.1} KiB per subscribed idle connection",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            per / 1024.0
        );
    }
    Ok((fleet, memory))
}

/// Fails early, with a clear message, when no daemon answers.
async fn check_ready(target: &Target) -> anyhow::Result<()> {
    let url = format!("{}/readyz", target.http);
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let mut response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot reach clusterd at {} (is it running? `make run`)", target.http))?;
    if !response.status().is_success() {
        let body = response.body().await.unwrap_or_default();
        bail!("clusterd at {} is not ready: {} {}", target.http, response.status(), String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn describe(args: &Args, target: &Target, seed: u64) -> String {
    let pace = if args.rate > 0.0 { format!("{} msg/s", args.rate) } else { "flat out".to_owned() };
    let stop = match (args.duration, args.count) {
        (Some(secs), Some(count)) => format!("{secs} s or {count} messages"),
        (Some(secs), None) => format!("{secs} s"),
        (None, Some(count)) => format!("{count} messages"),
        (None, None) => unreachable!("clap requires --duration or --count"),
    };
    let window = match args.transport {
        Transport::Ws => format!(" ({} in flight each)", args.inflight),
        Transport::Http => String::new(),
    };
    let texts = args.texts.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    let events = match args.event_sockets() {
        0 => "events off".to_owned(),
        n => format!("events on ({n} sockets)"),
    };
    let creators = match &args.creator_prefix {
        Some(prefix) => format!("{} creators {prefix}0..{}", args.creators, args.creators - 1),
        None => format!("{} creators", args.creators),
    };
    format!(
        "{} x {}{window}, {pace}, {stop}, {creators}, texts {texts}, {events}, seed {seed}, {}",
        args.connections,
        args.transport.as_str(),
        target.http,
    )
}

/// Subscribes to every run creator (when `--events`), before any message
/// is sent; returns the listening tasks.
async fn subscribe(run: &Rc<Run>, target: &Target) -> anyhow::Result<Vec<JoinHandle<()>>> {
    if !run.stats.borrow().tracks_events() {
        return Ok(Vec::new());
    }
    let mut listeners = Vec::new();
    for (index, creators) in run.creators.chunks(CREATORS_PER_EVENT_SOCKET).enumerate() {
        let (subscriber, socket) = Subscriber::connect(run, index, &target.ws, creators).await?;
        listeners.push(rt::spawn(subscriber.listen(run.clone(), socket)));
    }
    Ok(listeners)
}

/// The ingest connections, ready to send.
enum Senders {
    Ws(Vec<ws_ingest::Connection>),
    Http { client: awc::Client, url: Rc<str>, connections: usize, rate: f64 },
}

impl Senders {
    /// Opens every WebSocket up front, so that a refused connection fails
    /// the run before it starts rather than skewing it.
    async fn connect(args: &Args, target: &Target) -> anyhow::Result<Self> {
        let connections = args.connections as usize;
        let rate = args.rate / connections as f64;
        match args.transport {
            Transport::Ws => {
                let mut sockets = Vec::with_capacity(connections);
                let url: Rc<str> = target.ws.as_str().into();
                for index in 0..connections {
                    let socket = socket::connect(&target.ws).await?;
                    sockets.push(ws_ingest::Connection {
                        index,
                        socket,
                        inflight: args.inflight as usize,
                        rate,
                        keep_going: args.keep_going,
                        url: url.clone(),
                    });
                }
                Ok(Self::Ws(sockets))
            }
            Transport::Http => Ok(Self::Http {
                client: http_ingest::client(connections, args.token.as_deref()),
                url: format!("{}/v1/messages", target.http).into(),
                connections,
                rate,
            }),
        }
    }

    fn spawn(self, run: &Rc<Run>) -> Vec<JoinHandle<()>> {
        match self {
            Self::Ws(connections) => {
                connections.into_iter().map(|conn| rt::spawn(ws_ingest::drive(run.clone(), conn))).collect()
            }
            Self::Http { client, url, connections, rate } => (0..connections)
                .map(|index| rt::spawn(http_ingest::drive(run.clone(), client.clone(), url.clone(), index, rate)))
                .collect(),
        }
    }
}

/// One progress line per second on stderr.
async fn progress(run: Rc<Run>, started: Instant) {
    let mut tick = tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let (mut last_time, mut last_acked) = (started, 0);
    loop {
        let now = tick.tick().await;
        let stats = run.stats.borrow();
        let rate = (stats.acked - last_acked) as f64 / (now - last_time).as_secs_f64();
        eprintln!("{}", report::progress_line(now - started, &stats, rate));
        (last_time, last_acked) = (now, stats.acked);
    }
}

/// Waits until every acked message has had its event, or `deadline`.
async fn drain_events(run: &Run, deadline: Instant) {
    while run.stats.borrow().awaiting_events() > 0 {
        if tokio::time::timeout_at(deadline, run.settled.notified()).await.is_err() {
            break;
        }
    }
}
