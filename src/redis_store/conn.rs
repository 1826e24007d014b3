//! Where the stores connect: one Redis node, or a Redis Cluster (cargo
//! feature `redis-cluster`), behind one connection type.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};

/// The server (or cluster) a store talks to.
// Made once per store: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Target {
    /// One node (or a Sentinel-managed master behind one URL).
    Single(redis::Client),
    /// A Redis Cluster: each script runs on its key's slot.
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster::ClusterClient),
}

/// A self-reconnecting connection to a [`Target`]; cloning is cheap.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

/// `rediss://` needs a rustls crypto provider: ring, unless the program
/// installed one of its own first.
fn tls_provider() {
    #[cfg(feature = "redis-tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Target {
    /// A connection made in the background: nothing waits for it here.
    pub(crate) fn connect_lazily(
        &self,
        connect_timeout: Duration,
        call_timeout: Duration,
        retry_interval: Duration,
    ) -> redis::RedisResult<Conn> {
        tls_provider();
        match self {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(call_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(retry_interval);
                ConnectionManager::new_lazy_with_config(client.clone(), config).map(Conn::Single)
            }
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(call_timeout);
                Ok(Conn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }

    /// A fresh connection, waited for (for checks).
    pub(crate) async fn connect_now(&self) -> redis::RedisResult<Conn> {
        tls_provider();
        match self {
            Target::Single(client) => ConnectionManager::new(client.clone())
                .await
                .map(Conn::Single),
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }

    /// Runs `PING` and loads `scripts` synchronously, each step within the
    /// given timeouts (on a cluster: on every master).
    pub(crate) fn check_blocking(
        &self,
        scripts: &[&redis::Script],
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> redis::RedisResult<()> {
        tls_provider();
        match self {
            Target::Single(client) => {
                let mut conn = client.get_connection_with_timeout(connect_timeout)?;
                conn.set_read_timeout(Some(call_timeout))?;
                conn.set_write_timeout(Some(call_timeout))?;
                redis::cmd("PING").query::<()>(&mut conn)?;
                for script in scripts {
                    script.load(&mut conn)?;
                }
                Ok(())
            }
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(call_timeout);
                let mut conn = client.get_connection_with_config(config)?;
                redis::cmd("PING").query::<()>(&mut conn)?;
                for script in scripts {
                    script.load(&mut conn)?;
                }
                Ok(())
            }
        }
    }

    /// Whether this is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Target::Single(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
