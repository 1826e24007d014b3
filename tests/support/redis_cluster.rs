//! A private Redis Cluster of three masters on free loopback ports, owned by
//! one test, so the test can kill and restart a master.
//!
//! Missing `redis-server` or `redis-cli` binaries fail the test with a clear
//! message: tests that need a cluster never pass silently without one.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One master of the cluster.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// A running cluster of three masters, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("cannot find a free loopback port: {e}"),
        };
        if port < 55_000 && bindable(port + 10_000) {
            return port;
        }
    }
    panic!("no free loopback port pair (p, p + 10000) for a cluster node");
}

fn require(binary: &str, package: &str) {
    let ok = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        panic!(
            "`{binary}` is required for the Redis Cluster tests but could not be run; \
             install it (Debian: apt-get install {package})"
        );
    }
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Node {
    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // Slots of a live master keep answering while another is down.
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        self.child = match child {
            Ok(c) => Some(c),
            Err(e) => panic!("failed to start redis-server: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if cli(self.port, &["PING"]).is_some_and(|r| r.contains("PONG")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cluster node on port {} did not answer PING", self.port);
    }

    /// Kills this master (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with its cluster configuration (it
    /// rejoins with the same slots, and without the scripts it had).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Whether this node answers `PING`.
    pub fn answers(&self) -> bool {
        cli(self.port, &["PING"]).is_some_and(|r| r.contains("PONG"))
    }

    /// Whether this node serves `key`'s slot: a `GET` answers without an
    /// error (a restarted master says `CLUSTERDOWN` until it has rejoined).
    pub fn serves(&self, key: &str) -> bool {
        cli(self.port, &["GET", key]).is_some_and(|r| {
            let r = r.trim_start();
            !(r.starts_with("CLUSTERDOWN")
                || r.starts_with("MOVED")
                || r.starts_with("ASK")
                || r.starts_with("ERR")
                || r.starts_with("TRYAGAIN"))
        })
    }

    /// The number of keys held by this node.
    pub fn keys(&self) -> u64 {
        cli(self.port, &["DBSIZE"])
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl RedisCluster {
    /// Starts three masters, joins them into a cluster and waits until every
    /// node reports `cluster_state:ok`.
    pub fn start() -> Self {
        require("redis-server", "redis-server");
        require("redis-cli", "redis-tools");
        let mut nodes: Vec<Node> = (0..3)
            .map(|_| Node {
                port: free_port(),
                child: None,
                dir: match tempfile::tempdir() {
                    Ok(d) => d,
                    Err(e) => panic!("tempdir: {e}"),
                },
            })
            .collect();
        for node in &mut nodes {
            node.start();
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match created {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("redis-cli --cluster create: {e}"),
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ok = self.nodes.iter().all(|n| {
                cli(n.port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the Redis Cluster never reached cluster_state:ok");
    }

    /// The `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// The index of the node serving `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let Some(slot) = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|r| r.trim().parse::<u16>().ok())
        else {
            panic!("CLUSTER KEYSLOT {key}")
        };
        let Some(slots) = cli(self.nodes[0].port, &["CLUSTER", "NODES"]) else {
            panic!("CLUSTER NODES")
        };
        for line in slots.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let owns = fields.iter().skip(8).any(|range| {
                let mut ends = range.split('-');
                let lo = ends.next().and_then(|v| v.parse::<u16>().ok());
                let hi = ends.next().and_then(|v| v.parse::<u16>().ok()).or(lo);
                matches!((lo, hi), (Some(lo), Some(hi)) if lo <= slot && slot <= hi)
            });
            if owns && let Some(i) = self.nodes.iter().position(|n| n.port == port) {
                return i;
            }
        }
        panic!("no node owns slot {slot} of {key}");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
