//! The file store against real files in temporary directories (the file
//! store is the crate's own, so these tests live inside it).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, ManualClock, Timestamp};
use crate::persistence::{
    FileProblem, FileStore, FileStoreOptions, KIND_CIRCUIT_BREAKER, KIND_RATE_LIMIT, LoadOutcome,
    OnCorrupt,
};
use crate::{ConfigError, StoreError};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

/// A stand-in for a breaker's per-key state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Breaker {
    open_until_ms: u64,
    failures: u32,
}

fn breaker(open_until_ms: u64) -> Breaker {
    Breaker {
        open_until_ms,
        failures: 3,
    }
}

fn setup() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    (dir, path)
}

fn open(path: &Path) -> Result<FileStore<Breaker>, StoreError> {
    open_with(path, FileStoreOptions::default())
}

fn open_with(
    path: &Path,
    options: FileStoreOptions<Breaker>,
) -> Result<FileStore<Breaker>, StoreError> {
    FileStore::open(path, KIND_CIRCUIT_BREAKER, options).map(|(store, _)| store)
}

/// Files in `dir` whose name contains `.corrupt-`.
fn set_aside_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect();
    found.sort();
    found
}

/// Writes a valid file with one entry and returns its bytes.
async fn valid_file(path: &Path) -> Vec<u8> {
    let store = open(path).unwrap();
    store.write_through("tool:a", breaker(10)).await.unwrap();
    store.shutdown().await.unwrap();
    fs::read(path).unwrap()
}

/// Opens `path` holding `bytes` with the default policy and checks that the
/// file was set aside whole for `expected`.
fn assert_set_aside(dir: &TempDir, path: &Path, bytes: &[u8], expected: FileProblem) {
    fs::write(path, bytes).unwrap();
    let (store, report) =
        FileStore::<Breaker>::open(path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert!(store.is_empty());
    let LoadOutcome::SetAside { problem, moved_to } = report.outcome else {
        panic!(
            "expected the file to be set aside, got {:?}",
            report.outcome
        );
    };
    assert_eq!(problem, expected);
    assert!(!path.exists(), "the bad file is no longer at its path");
    assert_eq!(set_aside_files(dir.path()), vec![moved_to.clone()]);
    assert_eq!(
        fs::read(&moved_to).unwrap(),
        bytes,
        "kept with its original bytes"
    );
}

#[tokio::test]
async fn state_survives_a_restart() {
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    store.update("tool:a", breaker(1));
    store.update("tool:b", breaker(2));
    store.write_through("session:x", breaker(3)).await.unwrap();
    let before = store.entries();
    drop(store);

    let (store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert_eq!(store.entries(), before);
    assert_eq!(store.len(), 3);
    assert_eq!(report.loaded, 3);
    assert!(matches!(report.outcome, LoadOutcome::Loaded { .. }));
}

#[tokio::test]
async fn the_file_is_a_versioned_envelope() {
    let (_dir, path) = setup();
    let clock = ManualClock::new();
    let store = open_with(
        &path,
        FileStoreOptions::default().clock(Arc::new(clock.clone())),
    )
    .unwrap();
    store.write_through("tool:a", breaker(5)).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["format"], "pmcp-resilience-state");
    assert_eq!(json["version"], 1);
    assert_eq!(json["kind"], "circuit_breaker");
    assert_eq!(json["saved_at_ms"], clock.now().as_millis());
    assert_eq!(json["entries"]["tool:a"]["open_until_ms"], 5);
}

#[tokio::test]
async fn a_missing_file_starts_empty() {
    let (_dir, path) = setup();
    let (store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert!(store.is_empty());
    assert_eq!(report.outcome, LoadOutcome::NoFile);
    assert!(!path.exists(), "nothing is written before there is state");
}

#[tokio::test]
async fn a_stray_partial_temp_file_leaves_the_previous_file_loadable() {
    let (_dir, path) = setup();
    let bytes = valid_file(&path).await;
    let temp = path.with_file_name("breakers.json.tmp");
    fs::write(&temp, &bytes[..bytes.len() / 2]).unwrap();

    let (store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert_eq!(store.get("tool:a"), Some(breaker(10)));
    assert!(report.removed_stale_temp);
    assert!(!temp.exists());
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[tokio::test]
async fn a_truncated_file_is_set_aside() {
    let (dir, path) = setup();
    let bytes = valid_file(&path).await;
    assert_set_aside(
        &dir,
        &path,
        &bytes[..bytes.len() - 7],
        FileProblem::Truncated,
    );
}

#[tokio::test]
async fn an_empty_file_is_set_aside_as_truncated() {
    let (dir, path) = setup();
    assert_set_aside(&dir, &path, b"", FileProblem::Truncated);
}

#[tokio::test]
async fn garbage_bytes_are_set_aside() {
    let (dir, path) = setup();
    let garbage = b"\x00\xffnot json at all\x13";
    fs::write(&path, garbage).unwrap();
    let (_store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    let LoadOutcome::SetAside { problem, moved_to } = report.outcome else {
        panic!("expected set aside, got {:?}", report.outcome);
    };
    assert!(matches!(problem, FileProblem::NotJson(_)), "{problem:?}");
    assert_eq!(fs::read(moved_to).unwrap(), garbage);
    assert_eq!(set_aside_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn state_of_another_kind_is_set_aside() {
    let (dir, path) = setup();
    let limiter = FileStore::<Breaker>::open(&path, KIND_RATE_LIMIT, FileStoreOptions::default())
        .unwrap()
        .0;
    limiter.write_through("tool:a", breaker(1)).await.unwrap();
    limiter.shutdown().await.unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_set_aside(
        &dir,
        &path,
        &bytes,
        FileProblem::WrongKind {
            expected: "circuit_breaker".into(),
            found: "rate_limit".into(),
        },
    );
}

#[tokio::test]
async fn json_of_another_program_is_set_aside() {
    let (dir, path) = setup();
    assert_set_aside(
        &dir,
        &path,
        br#"{"name":"my-app","entries":{}}"#,
        FileProblem::Foreign,
    );
}

#[tokio::test]
async fn a_future_version_is_set_aside() {
    let (dir, path) = setup();
    let future = br#"{"format":"pmcp-resilience-state","version":2,"kind":"circuit_breaker","saved_at_ms":1,"entries":{},"shards":[]}"#;
    assert_set_aside(
        &dir,
        &path,
        future,
        FileProblem::TooNew {
            found: 2,
            supported: 1,
        },
    );
}

#[tokio::test]
async fn entries_of_another_state_type_are_set_aside() {
    let (dir, path) = setup();
    let wrong = br#"{"format":"pmcp-resilience-state","version":1,"kind":"circuit_breaker","saved_at_ms":1,"entries":{"k":"open"}}"#;
    fs::write(&path, wrong).unwrap();
    let (_store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert!(
        matches!(
            report.outcome,
            LoadOutcome::SetAside {
                problem: FileProblem::BadEntries(_),
                ..
            }
        ),
        "{:?}",
        report.outcome
    );
    assert_eq!(fs::read(&set_aside_files(dir.path())[0]).unwrap(), wrong);
}

#[tokio::test]
async fn the_fail_policy_refuses_and_leaves_the_file_in_place() {
    let (dir, path) = setup();
    let future =
        br#"{"format":"pmcp-resilience-state","version":9,"kind":"circuit_breaker","entries":{}}"#;
    fs::write(&path, future).unwrap();
    let err = open_with(
        &path,
        FileStoreOptions::default().on_corrupt(OnCorrupt::Fail),
    )
    .unwrap_err();
    let StoreError::Corrupt(message) = &err else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("version 9"), "{message}");
    assert!(message.contains("OnCorrupt::StartEmpty"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), future, "the file is untouched");
    assert!(set_aside_files(dir.path()).is_empty());

    // The refusal released the lock: the default policy can open it next.
    let (_store, report) =
        FileStore::<Breaker>::open(&path, KIND_CIRCUIT_BREAKER, FileStoreOptions::default())
            .unwrap();
    assert!(matches!(report.outcome, LoadOutcome::SetAside { .. }));
}

#[tokio::test]
async fn a_set_aside_file_is_never_overwritten() {
    let (dir, path) = setup();
    let clock = ManualClock::new();
    let options = || FileStoreOptions::default().clock(Arc::new(clock.clone()));
    fs::write(&path, b"first bad").unwrap();
    drop(open_with(&path, options()).unwrap());
    fs::write(&path, b"second bad").unwrap();
    drop(open_with(&path, options()).unwrap()); // same millisecond

    let kept: Vec<Vec<u8>> = set_aside_files(dir.path())
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert_eq!(kept.len(), 2);
    assert!(kept.contains(&b"first bad".to_vec()));
    assert!(kept.contains(&b"second bad".to_vec()));
}

#[tokio::test]
async fn stale_entries_are_expired_on_load() {
    let (_dir, path) = setup();
    let clock = ManualClock::starting_at(Timestamp::from_millis(1_000));
    let store = open(&path).unwrap();
    store.update("expired", breaker(1_500));
    store.update("still-open", breaker(5_000));
    store.shutdown().await.unwrap();

    clock.set(Timestamp::from_millis(2_000));
    let options = FileStoreOptions::default()
        .clock(Arc::new(clock.clone()))
        .expire_on_load(|b: &Breaker, now| Timestamp::from_millis(b.open_until_ms) > now);
    let (store, report) = FileStore::open(&path, KIND_CIRCUIT_BREAKER, options).unwrap();
    assert_eq!(report.loaded, 1);
    assert_eq!(report.expired, 1);
    assert_eq!(store.get("expired"), None);
    assert_eq!(store.get("still-open"), Some(breaker(5_000)));
}

#[tokio::test]
async fn a_second_store_on_the_same_file_is_refused_until_the_first_is_dropped() {
    let (_dir, path) = setup();
    let first = open(&path).unwrap();

    let err = open(&path).unwrap_err();
    let StoreError::Locked {
        path: locked,
        lock_path,
    } = &err
    else {
        panic!("expected Locked, got {err:?}");
    };
    assert_eq!(locked, &path);
    assert_eq!(lock_path, &path.with_file_name("breakers.json.lock"));
    assert!(err.to_string().contains("already in use"), "{err}");

    drop(first);
    assert!(open(&path).is_ok());
}

#[tokio::test]
async fn shutdown_writes_pending_state_and_releases_the_file() {
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    store.update("tool:a", breaker(1));
    assert!(store.stats().pending);
    store.shutdown().await.unwrap();

    let store = open(&path).unwrap();
    assert_eq!(store.get("tool:a"), Some(breaker(1)));
}

#[tokio::test]
async fn drop_writes_pending_state() {
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    store.update("tool:a", breaker(1));
    store.update("tool:b", breaker(2));
    assert_eq!(store.remove("tool:b"), Some(breaker(2)));
    drop(store);

    let store = open(&path).unwrap();
    assert_eq!(store.get("tool:a"), Some(breaker(1)));
    assert_eq!(store.get("tool:b"), None);
}

#[tokio::test]
async fn write_through_is_on_disk_when_it_returns() {
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    store.write_through("tool:a", breaker(42)).await.unwrap();
    assert!(!store.stats().pending);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(r#""tool:a":{"open_until_ms":42"#), "{text}");
}

#[tokio::test(start_paused = true)]
async fn updates_are_coalesced_into_one_write_per_interval() {
    let (_dir, path) = setup();
    let interval = Duration::from_millis(500);
    let store = open_with(&path, FileStoreOptions::default().flush_interval(interval)).unwrap();

    for i in 0..1_000 {
        store.update("tool:a", breaker(i));
    }
    tokio::time::sleep(interval - Duration::from_millis(10)).await;
    assert!(!path.exists(), "nothing is written before the interval");
    assert_eq!(store.stats().writes, 0);

    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.stats().writes, 1, "a thousand updates, one write");
    assert!(!store.stats().pending);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["entries"]["tool:a"]["open_until_ms"], 999);

    // Nothing changed: later ticks do not rewrite the file.
    tokio::time::sleep(interval * 3).await;
    assert_eq!(store.stats().writes, 1);
}

#[tokio::test]
async fn explicit_flush_writes_pending_updates() {
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    store.update("tool:a", breaker(1));
    store.flush().await.unwrap();
    assert_eq!(store.stats().writes, 1);
    assert!(fs::read_to_string(&path).unwrap().contains("tool:a"));
    store.flush().await.unwrap();
    assert_eq!(store.stats().writes, 1, "nothing pending, nothing written");
}

#[tokio::test]
async fn a_zero_flush_interval_is_a_config_error() {
    let (_dir, path) = setup();
    let options = FileStoreOptions::<Breaker>::default().flush_interval(Duration::ZERO);
    assert!(matches!(
        options.validate(),
        Err(ConfigError::Invalid {
            field: "flush_interval",
            ..
        })
    ));
    let err = open_with(&path, options).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Config(ConfigError::Invalid {
                field: "flush_interval",
                ..
            })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_missing_directory_is_a_clear_error() {
    let (dir, _) = setup();
    let path = dir.path().join("no-such-dir").join("state.json");
    let err = open(&path).unwrap_err();
    assert!(matches!(err, StoreError::File { .. }), "{err:?}");
    assert!(
        err.to_string().contains("does the directory exist"),
        "{err}"
    );
}

#[test]
fn opening_outside_a_runtime_is_a_clear_error() {
    let (_dir, path) = setup();
    let err = open(&path).unwrap_err();
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

/// Set in the child process of
/// [`a_store_in_another_process_is_refused_until_that_process_exits`].
const CHILD_PATH_VAR: &str = "PMCP_RESILIENCE_FILE_STORE_CHILD_PATH";

/// Not a test on its own: in the child process it holds the file until its
/// stdin closes; otherwise it does nothing.
#[tokio::test]
async fn child_process_holding_the_file() {
    let Some(path) = std::env::var_os(CHILD_PATH_VAR) else {
        return;
    };
    use std::io::{Read, Write};
    let _store = open(Path::new(&path)).unwrap();
    // Written to the handle, not with `println!`, which the test harness may capture.
    let mut out = std::io::stdout();
    out.write_all(b"\nstore-opened\n").unwrap();
    out.flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

#[tokio::test]
async fn a_store_in_another_process_is_refused_until_that_process_exits() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let (_dir, path) = setup();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "persistence::tests::child_process_holding_the_file",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_PATH_VAR, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read in a thread so a child that never gets there fails the test instead of hanging it.
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if line.trim() == "store-opened" {
                let _ = tx.send(());
            }
        }
    });
    let holding = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    if !holding {
        let _ = child.kill();
    }
    assert!(holding, "the child process opened the store");

    let err = open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");

    drop(child.stdin.take()); // the child exits
    assert!(child.wait().unwrap().success());
    assert!(open(&path).is_ok(), "the lock died with the process");
}

#[tokio::test]
async fn concurrent_write_throughs_all_reach_the_file() {
    let (_dir, path) = setup();
    let store = Arc::new(open(&path).unwrap());
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.write_through(format!("k{i}"), breaker(i)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let writes = store.stats().writes;
    assert!((1..=32).contains(&writes), "{writes}");
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["entries"].as_object().unwrap().len(), 32);
}

#[test]
fn the_store_and_its_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (_dir, path) = setup();
    let store = open(&path).unwrap();
    send_sync(&store);
    send(store.write_through("k", breaker(1)));
    send(store.flush());
}
