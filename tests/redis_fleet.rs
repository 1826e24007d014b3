//! A fleet of three processes sharing one breaker through Redis, with the
//! default `RedisOptions`: when the open time ends, 1000 callers at once
//! get exactly the policy's probe limit between them.
#![cfg(feature = "redis")]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pmcp_resilience::circuit_breaker::state::{BreakerPolicy, Verdict};
use pmcp_resilience::redis_store::{RedisBreakerStore, RedisOptions};
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitBreakerStateStore, StatePersistence, Timestamp,
};
use support::redis::RedisServer;

const URL_ENV: &str = "PMCP_FLEET_REDIS_URL";
const CALLERS_ENV: &str = "PMCP_FLEET_CALLERS";
const KEY: &str = "server:https://upstream";
const PREFIX: &str = "fleet:";
const OPEN_TIME: Duration = Duration::from_secs(3);

fn client(url: &str) -> redis::Client {
    match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Child role: a breaker with the default Redis options; waits for `GO
/// <unix ms>`, checks the breaker once, then at that instant starts its
/// callers all at once and prints how many were admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_half_open_callers() {
    let Ok(url) = std::env::var(URL_ENV) else {
        return;
    };
    let callers: usize = std::env::var(CALLERS_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let cb = match CircuitBreakerMiddleware::builder()
        .failure_threshold(3)
        .timeout(OPEN_TIME)
        .persistence(StatePersistence::Redis {
            client: client(&url),
            key_prefix: PREFIX.to_owned(),
        })
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker: {e}"),
    };
    // Connect and load the script, as a process that has been serving would have.
    for _ in 0..50 {
        if let Ok(p) = cb.acquire("warm-up").await {
            p.record(Verdict::Success).await;
        }
        if cb.store_errors() == 0 {
            break;
        }
    }
    println!("READY");
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        line
    })
    .await
    .unwrap_or_default();
    let start: u64 = line
        .trim()
        .strip_prefix("GO ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no start time in {line:?}"));
    // The breaker is open in Redis now: this process sees it once.
    match cb.acquire(KEY).await {
        Err(_) => {}
        Ok(p) => p.record(Verdict::Neutral).await,
    }
    tokio::time::sleep(Duration::from_millis(start.saturating_sub(unix_ms()))).await;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let cb = cb.clone();
            tokio::spawn(async move {
                let errors = cb.store_errors();
                let p = cb.acquire(KEY).await.ok();
                if p.is_some() {
                    println!(
                        "admitted at {} errors {} -> {}",
                        unix_ms(),
                        errors,
                        cb.store_errors()
                    );
                }
                p
            })
        })
        .collect();
    let mut permits = Vec::new();
    for t in tasks {
        if let Ok(Some(p)) = t.await {
            permits.push(p);
        }
    }
    let probes = permits.iter().filter(|p| p.is_probe()).count();
    println!(
        "ADMITTED={} PROBES={probes} STORE_ERRORS={}",
        permits.len(),
        cb.store_errors()
    );
    let _ = std::io::stdout().flush();
    // Hold the probes until every process has made its calls: a probe
    // given back earlier would rightly be given to a later caller.
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await;
    drop(permits);
}

fn field(text: &str, name: &str) -> u64 {
    text.split(&format!("{name}="))
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("child printed no {name}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_callers_in_three_processes_get_exactly_the_probe_limit() {
    let server = RedisServer::start();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("current_exe: {e}"),
    };
    let mut children = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let mut outputs = Vec::new();
    for callers in [334, 333, 333] {
        let spawned = Command::new(&exe)
            .args([
                "--exact",
                "child_half_open_callers",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(URL_ENV, server.url())
            .env(CALLERS_ENV, callers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => panic!("spawn child: {e}"),
        };
        let Some(stdout) = child.stdout.take() else {
            panic!("child stdout")
        };
        let ready = ready_tx.clone();
        let (out_tx, out_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim_end().ends_with("READY") {
                    let _ = ready.send(());
                }
                all.push_str(&line);
                all.push('\n');
                if line.contains("ADMITTED=") {
                    let _ = out_tx.send(all.clone());
                }
            }
            let _ = out_tx.send(all);
        });
        outputs.push(out_rx);
        children.push(child);
    }
    for _ in 0..3 {
        if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            panic!("a child never became ready");
        }
    }
    // The fleet's breaker opens (seen by another process).
    let other = match RedisBreakerStore::new(
        client(&server.url()),
        RedisOptions::default()
            .key_prefix(PREFIX)
            .call_timeout(Duration::from_secs(5)),
    ) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        timeout: OPEN_TIME,
        ..BreakerPolicy::default()
    };
    let opened = unix_ms();
    for _ in 0..3 {
        let r = other
            .record(
                KEY,
                &policy,
                Timestamp::from_nanos(0),
                Verdict::Failure,
                Duration::ZERO,
                None,
                0.5,
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
    }
    let start = opened + OPEN_TIME.as_millis() as u64 + 500;
    for child in &mut children {
        let Some(stdin) = child.stdin.as_mut() else {
            panic!("child stdin")
        };
        if let Err(e) = writeln!(stdin, "GO {start}") {
            panic!("child stdin: {e}");
        }
    }
    let mut admitted = 0;
    let mut report = String::new();
    // Every process's count first, while all of them still hold their probes.
    for out in &outputs {
        let text = out
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_default();
        admitted += field(&text, "ADMITTED");
        report.push_str(&text);
    }
    for child in &mut children {
        if let Some(stdin) = child.stdin.as_mut() {
            let _ = writeln!(stdin, "DONE");
        }
        let status = child.wait();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "child failed: {report}"
        );
    }
    let stored = other.get_state(KEY).await;
    assert_eq!(
        admitted,
        u64::from(policy.half_open_max_probes),
        "1000 callers in 3 processes, probe limit {}:\n{report}\nin Redis: {stored:?}",
        policy.half_open_max_probes
    );
}
