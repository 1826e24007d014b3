//! The Lua scripts. Each mirrors a pure function of this crate line by line,
//! on whole microseconds (see the module docs on time resolution).
//!
//! Both take `ARGV[1]` = the time in microseconds, or `-1` for the server's
//! `TIME`. Production always sends `-1`; only the parity tests inject a time.

/// Limiter: `KEYS[1]` = the key's state (`"a:b:c"`, microseconds).
///
/// `ARGV`: 1 now, 2 kind (1 fixed window, 2 sliding window, 3 token bucket,
/// 4 leaky bucket), 3 limit (max or capacity), 4 window or interval (µs),
/// 5 op (`a` acquire, `c` cancel), then for `a`: 6 cost, 7 max wait (µs),
/// 8 `1` to have the states in every reply; for `c`: 6..8 the state before
/// the reservation, 9..11 the state after.
///
/// Reply to `a`: `{allowed, remaining, reset_in, retry_after (-1: never),
/// wait}` (`reset_in`: `reset_at` minus the time the script decided at, so
/// the caller can put it on its own clock), followed by `before_a, before_b,
/// before_c, after_a, after_b, after_c` when `wait > 0` (a reservation) or
/// when asked; to `c`: `{1}` if refunded, `{0}` otherwise.
pub(crate) const LIMITER: &str = include_str!("limiter.lua");

/// Breaker: `KEYS[1]` = the key's state, `"state mode consecutive_failures
/// half_open_successes trips opened_at open_until next_probe [id deadline]*"`
/// (times in µs; state 0 closed, 1 open, 2 half-open; mode 0 normal,
/// 1 forced open, 2 forced closed, 3 disabled, 4 metrics only).
///
/// `ARGV`: 1 now, 2 op (`a` acquire, `r` record, `m` set mode), 3
/// consecutive failures that trip, 4 probe successes that close, 5 open time
/// (µs), 6 probes at once, 7 probe deadline (µs), 8 key TTL (ms), 9 result
/// (0 success, 1 failure, 2 neutral) or, for `m`, the mode, 10 probe id (-1:
/// none).
///
/// A key in a mode other than normal is written without expiry; resetting
/// the mode writes it with the TTL again (or deletes it if quiet).
///
/// Reply to `a`: `{allowed, probe (-1 none), retry_after (µs), from, to,
/// reason}`; to `r`: `{from, to, reason}`, `from = -1` when nothing changed;
/// to `m`: `{}`.
/// Reasons: 0 consecutive failures, 1 probe failed, 2 probe deadline, 3 open
/// time elapsed, 4 probes succeeded.
pub(crate) const BREAKER: &str = include_str!("breaker.lua");

/// `EVALSHA <sha of script> 1 <key>`, with room for `args` more arguments.
///
/// Built straight into one command buffer: going through
/// `redis::ScriptInvocation` allocated every argument on its own and then
/// copied them all into the command, the larger part of the client's work
/// per decision.
pub(crate) fn evalsha(script: &redis::Script, key: &str, args: usize) -> redis::Cmd {
    let hash = script.get_hash();
    let mut cmd = redis::Cmd::with_capacity(4 + args, 8 + hash.len() + key.len() + 24 * args);
    cmd.arg("EVALSHA").arg(hash).arg(1).arg(key);
    cmd
}

/// Runs `cmd` (made by [`evalsha`]), loading `script` and running it once
/// more after `NOSCRIPT` (a restarted, flushed or failed-over Redis), as
/// `redis::ScriptInvocation::invoke_async` does.
pub(crate) async fn run<T, C>(
    script: &redis::Script,
    cmd: &redis::Cmd,
    conn: &mut C,
) -> redis::RedisResult<T>
where
    T: redis::FromRedisValue,
    C: redis::aio::ConnectionLike,
{
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}
