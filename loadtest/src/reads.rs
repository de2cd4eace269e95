//! `--mode read` and `--mode mix`: reads, alone or beside ingest, over
//! HTTP keep-alive, with percentiles per route.
//!
//! Both first post `--prefill` messages to each creator (if any) and wait
//! until every creator lists at least one cluster (fresh creators need a
//! prefill; `--creator-prefix` names loaded ones). Then
//! `--connections` tasks claim operation numbers until `--count` or
//! `--duration`:
//!
//! - `read`: even numbers list a creator's clusters
//!   (`GET /v1/creators/{id}/clusters?limit=20`), odd ones read one of its
//!   clusters (`GET /v1/clusters/{id}`, from the clusters its first page
//!   showed);
//! - `mix`: the seed's load, 8 ingests (`POST /v1/messages`) then 2 lists
//!   in every 10 operation numbers, each for a random creator (the seed's
//!   scenario uses three: `--creators 3`).
//!
//! The report gives each route's latency, the throughput, the errors by
//! code, and the query cache's hits and misses during the run (from the
//! daemon's `/metrics`, before and after).

use std::{cell::RefCell, collections::BTreeMap, fmt::Write as _, rc::Rc, time::Duration};

use actix_web::rt;
use anyhow::{Context, bail};
use awc::{Client, http::StatusCode};
use clusterd::protocol::MessageInput;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::{
    cli::{Args, Mode, Target},
    http_ingest,
    pacer::Pacer,
    report::latency_summary,
    run::Run,
    texts::Rng,
};

/// Longest wait, after the prefill, for every creator to list a cluster.
const PREFILL_WAIT: Duration = Duration::from_secs(120);
/// Largest answer body read.
const MAX_BODY: usize = 16 << 20;
/// Prefill messages are numbered from here, apart from the run's own.
const PREFILL_SEQ: u64 = 1 << 62;

/// The routes a run times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    List,
    Detail,
    Ingest,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::List => "list clusters",
            Self::Detail => "cluster detail",
            Self::Ingest => "ingest",
        }
    }
}

#[derive(Default)]
struct Recorder {
    latency: BTreeMap<Op, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    done: u64,
}

impl Recorder {
    fn record(&mut self, op: Op, took: Duration) {
        self.done += 1;
        self.latency
            .entry(op)
            .or_insert_with(|| Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
            .saturating_record(took.as_micros() as u64);
    }
}

/// What every connection task shares.
struct Shared {
    run: Run,
    client: Client,
    http: String,
    mode: Mode,
    /// Cluster ids of each creator (index as in `run.creators`), for detail
    /// reads.
    clusters: Vec<Vec<String>>,
    recorder: RefCell<Recorder>,
}

pub async fn execute(args: Args, target: Target) -> anyhow::Result<()> {
    let run = Run::new(args.creators, args.creator_prefix.as_deref(), args.seed, args.texts, args.limits()?, false);
    let client = http_ingest::client(args.connections as usize, args.token.as_deref());
    let description = format!(
        "mode {}, {} x http, {}, {} creators, seed {}, {}",
        if args.mode == Mode::Read { "read" } else { "mix" },
        args.connections,
        if args.rate > 0.0 { format!("{} ops/s", args.rate) } else { "flat out".to_owned() },
        args.creators,
        run.seed,
        target.http
    );
    eprintln!("loadtest: run {}: {description}", run.id);
    if args.prefill > 0 {
        prefill(&run, &client, &target.http, args.prefill).await?;
    }
    let clusters = wait_for_clusters(&run, &client, &target.http).await?;
    let before = cache_counts(&client, &target.http).await?;
    let shared = Rc::new(Shared {
        run,
        client,
        http: target.http.clone(),
        mode: args.mode,
        clusters,
        recorder: RefCell::default(),
    });
    let started = shared.run.plan.start();
    let rate = args.rate / f64::from(args.connections);
    let tasks = (0..args.connections as usize).map(|index| rt::spawn(drive(shared.clone(), index, rate)));
    join_all(tasks).await;
    let elapsed = started.elapsed();
    let after = cache_counts(&shared.client, &target.http).await?;

    let recorder = shared.recorder.borrow();
    let mut out = String::new();
    let _ = writeln!(out, "run {}: {description}", shared.run.id);
    let secs = elapsed.as_secs_f64();
    let _ =
        writeln!(out, "operations      {} in {secs:.2} s ({:.0} ops/s)", recorder.done, recorder.done as f64 / secs);
    let errors: u64 = recorder.errors.values().sum();
    let codes: Vec<String> = recorder.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
    let _ = writeln!(
        out,
        "errors          {errors}{}",
        if errors > 0 { format!(" ({})", codes.join(", ")) } else { "".into() }
    );
    for (op, histogram) in &recorder.latency {
        let _ = writeln!(out, "{:<15} {}", op.name(), latency_summary(histogram));
    }
    for route in ["list", "detail"] {
        let count = |counts: &BTreeMap<(String, String), f64>, result: &str| {
            counts.get(&(route.to_owned(), result.to_owned())).copied().unwrap_or(0.0)
        };
        let hits = count(&after, "hit") - count(&before, "hit");
        let misses = count(&after, "miss") - count(&before, "miss");
        if hits + misses > 0.0 {
            let rate = 100.0 * hits / (hits + misses);
            let _ = writeln!(out, "cache {route:<9} hit {hits:.0} miss {misses:.0} ({rate:.1} % hits)");
        }
    }
    print!("{out}");
    if recorder.done == 0 {
        bail!("no operation succeeded");
    }
    Ok(())
}

/// `--prefill` messages for each creator, sent over every connection.
async fn prefill(run: &Run, client: &Client, http: &str, per_creator: u32) -> anyhow::Result<()> {
    let url = format!("{http}/v1/messages");
    let mut rng = run.rng(usize::MAX);
    let mut sent = 0u64;
    for round in 0..u64::from(per_creator) {
        let posts = run.creators.iter().enumerate().map(|(k, creator)| {
            let seq = PREFILL_SEQ + round * run.creators.len() as u64 + k as u64;
            let mut message = run.message(seq, &mut rng);
            message.creator_id = creator.clone();
            post_message(client, &url, message)
        });
        for outcome in join_all(posts).await {
            outcome.map_err(|code| anyhow::anyhow!("prefill ingest failed: {code}"))?;
            sent += 1;
        }
    }
    eprintln!("loadtest: prefilled {sent} messages");
    Ok(())
}

/// Each creator's cluster ids (first page), once every creator has one.
async fn wait_for_clusters(run: &Run, client: &Client, http: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let deadline = Instant::now() + PREFILL_WAIT;
    let mut ids = Vec::with_capacity(run.creators.len());
    for creator in &run.creators {
        loop {
            let body = get(client, &list_url(http, creator)).await.map_err(|code| anyhow::anyhow!("list: {code}"))?;
            let page: serde_json::Value = serde_json::from_slice(&body).context("list clusters answer")?;
            let found: Vec<String> = page["clusters"]
                .as_array()
                .map(|clusters| clusters.iter().filter_map(|c| c["id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            if !found.is_empty() {
                ids.push(found);
                break;
            }
            if Instant::now() >= deadline {
                bail!("creator {creator} has no cluster after {PREFILL_WAIT:?} (is the embedder running?)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(ids)
}

async fn drive(shared: Rc<Shared>, index: usize, rate: f64) {
    let mut rng: Rng = shared.run.rng(index);
    let mut pacer = Pacer::new(rate);
    let ingest_url = format!("{}/v1/messages", shared.http);
    loop {
        pacer.ready().await;
        let Some(seq) = shared.run.plan.claim() else { break };
        let creator = rng.below(shared.run.creators.len());
        let op = match shared.mode {
            Mode::Read if seq % 2 == 0 => Op::List,
            Mode::Read => Op::Detail,
            _ if seq % 10 < 8 => Op::Ingest,
            _ => Op::List,
        };
        let started = Instant::now();
        let outcome = match op {
            Op::List => get(&shared.client, &list_url(&shared.http, &shared.run.creators[creator])).await.map(drop),
            Op::Detail => {
                let id = rng.pick(&shared.clusters[creator]);
                get(&shared.client, &format!("{}/v1/clusters/{id}", shared.http)).await.map(drop)
            }
            Op::Ingest => {
                let mut message = shared.run.message(seq, &mut rng);
                message.creator_id = shared.run.creators[creator].clone();
                post_message(&shared.client, &ingest_url, message).await
            }
        };
        let mut recorder = shared.recorder.borrow_mut();
        match outcome {
            Ok(()) => recorder.record(op, started.elapsed()),
            Err(code) => *recorder.errors.entry(format!("{} {code}", op.name())).or_default() += 1,
        }
    }
}

fn list_url(http: &str, creator: &str) -> String {
    format!("{http}/v1/creators/{creator}/clusters?limit=20")
}

async fn get(client: &Client, url: &str) -> Result<actix_web::web::Bytes, String> {
    let mut response = client.get(url).send().await.map_err(|e| e.to_string())?;
    let body = response.body().limit(MAX_BODY).await.map_err(|_| "transport".to_owned())?;
    match response.status() {
        StatusCode::OK => Ok(body),
        status => Err(format!("http_{}", status.as_u16())),
    }
}

async fn post_message(client: &Client, url: &str, message: MessageInput) -> Result<(), String> {
    let mut response = client.post(url).send_json(&message).await.map_err(|e| e.to_string())?;
    let _ = response.body().limit(MAX_BODY).await;
    match response.status() {
        StatusCode::OK | StatusCode::ACCEPTED => Ok(()),
        status => Err(format!("http_{}", status.as_u16())),
    }
}

/// `clusterd_query_cache_total` by (route, result), from `/metrics`.
async fn cache_counts(client: &Client, http: &str) -> anyhow::Result<BTreeMap<(String, String), f64>> {
    let body = get(client, &format!("{http}/metrics")).await.map_err(|code| anyhow::anyhow!("/metrics: {code}"))?;
    Ok(parse_cache_counts(&String::from_utf8_lossy(&body)))
}

fn parse_cache_counts(metrics: &str) -> BTreeMap<(String, String), f64> {
    let label = |labels: &str, name: &str| {
        labels
            .split(',')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"').map(str::to_owned))
    };
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("clusterd_query_cache_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            Some(((label(labels, "route")?, label(labels, "result")?), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_counts_are_read_from_the_exposition() {
        let text = "# HELP clusterd_query_cache_total lookups\n\
                    clusterd_query_cache_total{result=\"hit\",route=\"list\"} 12\n\
                    clusterd_query_cache_total{route=\"detail\",result=\"miss\"} 3\n\
                    clusterd_query_cache_errors_total 1\n";
        let counts = parse_cache_counts(text);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[&("list".to_owned(), "hit".to_owned())], 12.0);
        assert_eq!(counts[&("detail".to_owned(), "miss".to_owned())], 3.0);
    }
}
