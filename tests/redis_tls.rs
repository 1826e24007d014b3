//! The Redis stores over TLS (`rediss://`, cargo feature `redis-tls`),
//! against a `redis-server --tls-port` whose certificate the test makes with
//! `openssl`.
#![cfg(feature = "redis-tls")]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pmcp_resilience::rate_limit::RateLimitStrategy;
use pmcp_resilience::redis_store::RedisOptions;
use pmcp_resilience::{CircuitBreakerMiddleware, RateLimitMiddleware, StatePersistence};

fn run(cmd: &mut Command) {
    match cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!(
            "{cmd:?} could not run ({e}); the TLS test needs openssl (Debian: apt-get install openssl)"
        ),
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    let p = |name: &str| dir.join(name);
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=pmcp test CA"])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    if let Err(e) = std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    ) {
        panic!("ext.cnf: {e}");
    }
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .arg("-in")
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.crt"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("server.crt")));
}

struct TlsRedis {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis() -> TlsRedis {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    make_certificates(dir.path());
    let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("free port: {e}"),
    };
    let p = |name: &str| dir.path().join(name);
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(p("server.crt"))
        .arg("--tls-key-file")
        .arg(p("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(p("ca.crt"))
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "redis-server is required for this test but could not start ({e}); install it \
             (Debian: apt-get install redis-server)"
        ),
    };
    let server = TlsRedis { port, child, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server --tls-port never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn tls_client(server: &TlsRedis) -> redis::Client {
    let ca = match std::fs::read(server.dir.path().join("ca.crt")) {
        Ok(ca) => ca,
        Err(e) => panic!("ca.crt: {e}"),
    };
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    match redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    ) {
        Ok(c) => c,
        Err(e) => panic!("TLS client: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_breakers_are_shared_over_tls() {
    let server = start_tls_redis();
    let options = RedisOptions::default()
        .call_timeout(Duration::from_secs(5))
        .verify_on_build(true);
    let build = || {
        RateLimitMiddleware::builder()
            .strategy(RateLimitStrategy::FixedWindow {
                max_requests: 3,
                window: Duration::from_secs(3600),
            })
            .persistence(StatePersistence::Redis {
                client: tls_client(&server),
                key_prefix: "tls:".into(),
            })
            .redis_options(options.clone())
            .build()
    };
    // verify_on_build: the TLS handshake, PING and script load succeeded.
    let (a, b) = match (build(), build()) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("build over TLS: {:?} {:?}", a.err(), b.err()),
    };
    assert_eq!(a.store_report().kind, "redis");
    let limiter = match pmcp_resilience::redis_store::RedisRateLimiter::new(
        tls_client(&server),
        RateLimitStrategy::FixedWindow {
            max_requests: 3,
            window: Duration::from_secs(3600),
        },
        options.clone().key_prefix("tls:"),
    ) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    use pmcp_resilience::rate_limit::RateLimiter;
    let key = pmcp_resilience::ScopeKey::new("tenant:tls");
    let mut admitted = 0;
    for _ in 0..5 {
        match limiter
            .check(&key, 1, pmcp_resilience::Timestamp::from_nanos(0))
            .await
        {
            Ok(d) if d.allowed => admitted += 1,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(admitted, 3, "one shared limit over TLS");
    assert_eq!(limiter.health().store_errors, 0);
    drop((a, b));

    let cb = match CircuitBreakerMiddleware::builder()
        .failure_threshold(1)
        .persistence(StatePersistence::Redis {
            client: tls_client(&server),
            key_prefix: "tls:".into(),
        })
        .redis_options(options.clone())
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("{e}"),
    };
    match cb.acquire("tool:x").await {
        Ok(p) => {
            p.record(pmcp_resilience::circuit_breaker::Verdict::Failure)
                .await
        }
        Err(e) => panic!("{e}"),
    }
    assert!(
        cb.acquire("tool:x").await.is_err(),
        "opened through Redis over TLS"
    );
    assert_eq!(cb.store_errors(), 0);

    // A client that does not trust the CA is refused at build.
    let untrusted = RateLimitMiddleware::builder()
        .persistence(StatePersistence::Redis {
            client: match redis::Client::open(format!("rediss://127.0.0.1:{}/", server.port)) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            },
            key_prefix: "tls:".into(),
        })
        .redis_options(options)
        .build();
    assert!(
        untrusted.is_err(),
        "an untrusted certificate must fail verification"
    );
}
