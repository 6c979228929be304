//! A private `redis-server` for a test.
//!
//! [`RedisServer::start`] runs `redis-server` from `PATH` in a fresh temporary directory on a free
//! loopback port, with persistence off, and waits until it answers `PING`. Dropping it stops the
//! server and removes the directory. [`stop`](RedisServer::stop) and
//! [`restart`](RedisServer::restart) let a test take Redis away and bring it back on the same port.
//!
//! ```no_run
//! let redis = moat_testkit::redis::RedisServer::start().unwrap();
//! println!("{}", redis.url()); // redis://127.0.0.1:PORT
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first `PING`.
const STARTUP: Duration = Duration::from_secs(10);

/// Why the server could not be started.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisError {
    /// `redis-server` is not on `PATH`.
    NotInstalled,
    /// Starting, or waiting for, the server failed.
    Io(std::io::Error),
    /// The server did not answer `PING` in time.
    NotReady(String),
}

impl fmt::Display for RedisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisError::NotInstalled => f.write_str(
                "redis-server was not found on PATH: install Debian's `redis-server` package \
                 (apt-get install redis-server), or run scripts/test, which installs it",
            ),
            RedisError::Io(e) => write!(f, "could not run redis-server: {e}"),
            RedisError::NotReady(log) => {
                write!(
                    f,
                    "redis-server did not answer PING within {STARTUP:?}; its log:\n{log}"
                )
            }
        }
    }
}

impl std::error::Error for RedisError {}

/// A running private `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Extra arguments (cluster mode), kept for restarts.
    args: Vec<String>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> Result<Self, RedisError> {
        Self::start_with(&[])
    }

    /// Starts a server on a free loopback port with these extra `redis-server` arguments.
    pub fn start_with(args: &[&str]) -> Result<Self, RedisError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(RedisError::Io)?;
        let port = free_port().map_err(RedisError::Io)?;
        let mut server = Self {
            child: None,
            port,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), RedisError> {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RedisError::NotInstalled,
                _ => RedisError::Io(e),
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(log).unwrap_or_default();
        self.stop();
        Err(RedisError::NotReady(log))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (connections to it start failing); the port stays reserved for
    /// [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) -> Result<(), RedisError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Cluster of primaries on loopback (`redis-server` in cluster mode, joined with
/// `redis-cli --cluster create`), ready once every node reports `cluster_state:ok`.
///
/// ```no_run
/// let cluster = moat_testkit::redis::RedisCluster::start(3).unwrap();
/// println!("{:?}", cluster.urls()); // ["redis://127.0.0.1:PORT", ...]
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` nodes (at least 3) and joins them into one cluster, the 16,384 slots
    /// split between them.
    pub fn start(primaries: usize) -> Result<Self, RedisError> {
        let nodes = (0..primaries.max(3))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(RedisError::Io)?;
        if !out.status.success() {
            return Err(RedisError::NotReady(
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        let cluster = Self { nodes };
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if cluster.nodes.iter().all(|n| cluster_ok(n.port)) {
                return Ok(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(RedisError::NotReady(
            "the cluster did not reach cluster_state:ok".into(),
        ))
    }

    /// Every node's URL, `redis://127.0.0.1:PORT`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Whether the node on `port` says `cluster_state:ok`.
fn cluster_ok(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_stops_and_restarts() {
        let mut redis = match RedisServer::start() {
            Ok(redis) => redis,
            Err(RedisError::NotInstalled) => panic!("{}", RedisError::NotInstalled),
            Err(e) => panic!("{e}"),
        };
        assert!(ping(redis.port()));
        assert!(redis.url().starts_with("redis://127.0.0.1:"));
        redis.stop();
        assert!(!ping(redis.port()));
        redis.restart().unwrap();
        assert!(ping(redis.port()));
        let dir = redis.dir.clone();
        drop(redis);
        assert!(!dir.exists());
    }

    #[test]
    fn missing_binary_names_the_package() {
        let message = RedisError::NotInstalled.to_string();
        assert!(
            message.contains("apt-get install redis-server"),
            "{message}"
        );
    }
}
