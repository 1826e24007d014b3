//! A fleet of three processes sharing one breaker through Redis, with the
//! default `RedisOptions`: when the open time ends, 1000 callers at once
//! get exactly the policy's probe limit between them.
#![cfg(feature = "redis")]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
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

/// Longer than the link's retry interval (250 ms by default): after a
/// failure, the next call waits this long before trying Redis again.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// A generous bound on anything a loaded machine does before the burst.
const PATIENCE: Duration = Duration::from_secs(120);

fn read_line() -> String {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    line
}

async fn read_line_async() -> String {
    tokio::task::spawn_blocking(read_line)
        .await
        .unwrap_or_default()
}

/// Child role: a breaker with the default Redis options. Warms up until
/// Redis has answered it, says `READY`; on `SEE <until unix ms>` calls the
/// breaker until Redis has told it the breaker is open and says `SEEN`; on
/// `GO <unix ms>` starts its callers all at once at that instant and prints
/// how many were admitted; holds the probes until `DONE`.
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
    // Connect and load the script, as a process that has been serving
    // would have: until one call has been answered by Redis.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let errors = cb.store_errors();
        if let Ok(p) = cb.acquire("warm-up").await {
            p.record(Verdict::Success).await;
        }
        if cb.store_errors() == errors && cb.store_report().mode == "normal" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis did not answer the warm-up within {PATIENCE:?}"
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    println!("READY");

    let line = read_line_async().await;
    let open_until: u64 = line
        .trim()
        .strip_prefix("SEE ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no open time in {line:?}"));
    // This process learns from Redis that the breaker is open (a call
    // refused), as a process serving traffic would have before the open
    // time ends. An admitted call means Redis did not answer in time (the
    // last view was closed): give it back and ask again.
    loop {
        let errors = cb.store_errors();
        match cb.acquire(KEY).await {
            Err(_) if cb.store_errors() == errors => break,
            Err(_) => {}
            Ok(p) => p.record(Verdict::Neutral).await,
        }
        assert!(
            unix_ms() + RETRY_PAUSE.as_millis() as u64 * 2 < open_until,
            "this process could not see the open breaker before its open time ended \
             ({OPEN_TIME:?}); store errors: {}",
            cb.store_errors()
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    println!("SEEN");

    let line = read_line_async().await;
    let start: u64 = line
        .trim()
        .strip_prefix("GO ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no start time in {line:?}"));
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
    let _ = read_line_async().await;
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

/// A child process running [`child_half_open_callers`], and what it printed.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    printed: String,
}

impl Child {
    fn spawn(url: &str, callers: usize) -> Self {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => panic!("current_exe: {e}"),
        };
        let spawned = Command::new(exe)
            .args([
                "--exact",
                "child_half_open_callers",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(URL_ENV, url)
            .env(CALLERS_ENV, callers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let mut process = match spawned {
            Ok(c) => c,
            Err(e) => panic!("spawn child: {e}"),
        };
        let Some(stdout) = process.stdout.take() else {
            panic!("child stdout")
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Child {
            process,
            lines,
            printed: String::new(),
        }
    }

    /// Waits until the child prints a line containing `word`, within `within`.
    fn wait_for(&mut self, word: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.printed.push_str(&line);
                    self.printed.push('\n');
                    if line.contains(word) {
                        return;
                    }
                }
                Err(e) => panic!(
                    "the child did not print {word} within {within:?} ({e}); it printed:\n{}",
                    self.printed
                ),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let Some(stdin) = self.process.stdin.as_mut() else {
            panic!("child stdin")
        };
        if let Err(e) = writeln!(stdin, "{line}") {
            panic!("child stdin: {e}; it printed:\n{}", self.printed);
        }
    }

    /// Waits for the child to exit, within `within`; kills it after that.
    fn finish(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.process.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => return false,
            }
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_callers_in_three_processes_get_exactly_the_probe_limit() {
    let server = RedisServer::start();
    let mut children: Vec<Child> = [334, 333, 333]
        .into_iter()
        .map(|callers| Child::spawn(&server.url(), callers))
        .collect();
    for child in &mut children {
        child.wait_for("READY", PATIENCE);
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
    let open_until = opened + OPEN_TIME.as_millis() as u64;
    for child in &mut children {
        child.send(&format!("SEE {open_until}"));
    }
    for child in &mut children {
        child.wait_for("SEEN", PATIENCE);
    }
    // Every caller at once, half a second after the open time ends.
    let start = open_until + 500;
    for child in &mut children {
        child.send(&format!("GO {start}"));
    }
    // Every process's count first, while all of them still hold their probes.
    let mut admitted = 0;
    for child in &mut children {
        child.wait_for("ADMITTED=", PATIENCE);
        let last = child.printed.lines().last().unwrap_or_default().to_owned();
        admitted += field(&last, "ADMITTED");
    }
    let mut report = String::new();
    for child in &mut children {
        child.send("DONE");
        let ok = child.finish(PATIENCE);
        report.push_str(&child.printed);
        assert!(ok, "a child failed:\n{report}");
    }
    let stored = other.get_state(KEY).await;
    assert_eq!(
        admitted,
        u64::from(policy.half_open_max_probes),
        "1000 callers in 3 processes, probe limit {}:\n{report}\nin Redis: {stored:?}",
        policy.half_open_max_probes
    );
}
