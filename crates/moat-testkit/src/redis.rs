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
//!
//! Beside it: [`RedisCluster`] (primaries and replicas joined by `redis-cli --cluster create`),
//! [`RedisSentinel`] (a primary, its replicas and three sentinels watching them), and
//! [`TlsFiles`] (a certificate authority and a server certificate made with `openssl`) for
//! [`RedisServer::start_tls`].

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
    /// A config file given first (sentinels need one they can rewrite), kept for restarts.
    config: Option<PathBuf>,
    /// Extra arguments (cluster mode), kept for restarts.
    args: Vec<String>,
    tls_port: Option<u16>,
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
        let mut server = Self::prepare(args)?;
        server.spawn()?;
        Ok(server)
    }

    /// Starts a server that also takes TLS connections, on [`tls_url`](Self::tls_url), with
    /// the server certificate of `tls` (clients are not asked for one).
    pub fn start_tls(tls: &TlsFiles, args: &[&str]) -> Result<Self, RedisError> {
        let mut server = Self::prepare(args)?;
        server.add_tls(tls)?;
        server.spawn()?;
        Ok(server)
    }

    /// Listens for TLS too, on a new port, with `tls`'s server certificate.
    fn add_tls(&mut self, tls: &TlsFiles) -> Result<(), RedisError> {
        let tls_port = free_port().map_err(RedisError::Io)?;
        let mut tls_args = vec!["--tls-port".to_owned(), tls_port.to_string()];
        for (flag, file) in [
            ("--tls-cert-file", &tls.cert),
            ("--tls-key-file", &tls.key),
            ("--tls-ca-cert-file", &tls.ca),
        ] {
            tls_args.push(flag.to_owned());
            tls_args.push(file.display().to_string());
        }
        tls_args.extend(["--tls-auth-clients".to_owned(), "no".to_owned()]);
        tls_args.append(&mut self.args);
        self.args = tls_args;
        self.tls_port = Some(tls_port);
        Ok(())
    }

    /// Starts a sentinel watching the primary on `primary_port` as `master` (quorum 2, down
    /// after one second), with these extra config lines (`sentinel auth-pass ...`); with `tls`,
    /// it takes TLS connections too and speaks TLS to the servers.
    fn start_sentinel(
        master: &str,
        primary_port: u16,
        extra: &str,
        tls: Option<&TlsFiles>,
    ) -> Result<Self, RedisError> {
        let mut server = Self::prepare(&["--sentinel"])?;
        if let Some(tls) = tls {
            server.add_tls(tls)?;
            server
                .args
                .extend(["--tls-replication".to_owned(), "yes".to_owned()]);
        }
        let config = server.dir.join("sentinel.conf");
        let text = format!(
            "sentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {master} 1000\n\
             sentinel failover-timeout {master} 3000\n{extra}\n"
        );
        std::fs::write(&config, text).map_err(RedisError::Io)?;
        server.config = Some(config);
        server.spawn()?;
        Ok(server)
    }

    fn prepare(args: &[&str]) -> Result<Self, RedisError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(RedisError::Io)?;
        Ok(Self {
            child: None,
            port: free_port().map_err(RedisError::Io)?,
            dir,
            config: None,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            tls_port: None,
        })
    }

    fn spawn(&mut self) -> Result<(), RedisError> {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(&self.config)
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

    /// `rediss://127.0.0.1:PORT` for a server started by [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("rediss://127.0.0.1:{port}"))
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

/// A private Redis Cluster on loopback (`redis-server` in cluster mode, joined with
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
        Self::start_with(primaries, 0, &[])
    }

    /// Starts `primaries` (at least 3) with `replicas` each, every node given these extra
    /// `redis-server` arguments (`--requirepass`, `--masterauth`, ...), and joins them. A
    /// replica takes over its primary's slots about two seconds after the primary stops.
    pub fn start_with(
        primaries: usize,
        replicas: usize,
        args: &[&str],
    ) -> Result<Self, RedisError> {
        Self::launch(primaries, replicas, args, None)
    }

    /// As [`start_with`](Self::start_with), every node also taking TLS connections (its
    /// [`RedisServer::tls_url`]) with `tls`'s server certificate; the nodes speak TLS to each
    /// other, and a client connected by TLS is told the nodes' TLS ports.
    pub fn start_tls(
        primaries: usize,
        replicas: usize,
        tls: &TlsFiles,
        args: &[&str],
    ) -> Result<Self, RedisError> {
        Self::launch(primaries, replicas, args, Some(tls))
    }

    fn launch(
        primaries: usize,
        replicas: usize,
        args: &[&str],
        tls: Option<&TlsFiles>,
    ) -> Result<Self, RedisError> {
        let count = primaries.max(3) * (1 + replicas);
        let mut node_args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            // Replicas sync at once (not after the default 5 s), so they can be promoted.
            "--repl-diskless-sync-delay",
            "0",
        ];
        node_args.extend_from_slice(args);
        if tls.is_some() {
            node_args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        let nodes = (0..count)
            .map(|_| match tls {
                Some(tls) => RedisServer::start_tls(tls, &node_args),
                None => RedisServer::start_with(&node_args),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&addrs).args([
            "--cluster-replicas",
            &replicas.to_string(),
            "--cluster-yes",
        ]);
        if let Some(password) = password_in(args) {
            create.env("REDISCLI_AUTH", password);
        }
        let out = create
            .stdin(Stdio::null())
            .output()
            .map_err(RedisError::Io)?;
        if !out.status.success() {
            return Err(RedisError::NotReady(
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        let cluster = Self { nodes };
        cluster.wait_until_ok()?;
        if replicas > 0 {
            wait_for_replicas(&cluster.nodes)?;
        }
        Ok(cluster)
    }

    /// Every node's URL, `redis://127.0.0.1:PORT`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Every node's TLS URL, `rediss://127.0.0.1:PORT`, for a cluster started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().filter_map(RedisServer::tls_url).collect()
    }

    /// The nodes, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The running node that serves `slot` as its primary now, by index.
    pub fn primary_of(&self, slot: u16) -> Option<usize> {
        let nodes = self
            .nodes
            .iter()
            .find(|n| n.is_running())?
            .redis_cli(&["cluster", "nodes"])?;
        // `ID ADDR:PORT@BUS FLAGS MASTER PING PONG EPOCH STATE SLOT-RANGE...`
        let port = nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let primary = fields.get(2)?.contains("master") && !fields[2].contains("fail");
            let serves = fields
                .iter()
                .skip(8)
                .any(|range| match range.split_once('-') {
                    Some((a, b)) => {
                        a.parse().is_ok_and(|a: u16| a <= slot)
                            && b.parse().is_ok_and(|b: u16| slot <= b)
                    }
                    None => range.parse() == Ok(slot),
                });
            let port = fields
                .get(1)?
                .split(['@', ':'])
                .nth(1)?
                .parse::<u16>()
                .ok()?;
            (primary && serves).then_some(port)
        })?;
        self.nodes
            .iter()
            .position(|n| n.port == port && n.is_running())
    }

    /// Watches every running node (see [`Monitor`]).
    pub fn monitor(&self) -> Result<Monitor, RedisError> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port)
            .collect();
        let args: Vec<&str> = self.nodes[0].args.iter().map(String::as_str).collect();
        Monitor::start(&ports, password_in(&args))
    }

    /// The slot Redis puts `key` in (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> Option<u16> {
        self.nodes
            .iter()
            .find(|n| n.is_running())?
            .redis_cli(&["cluster", "keyslot", key])?
            .trim()
            .parse()
            .ok()
    }

    /// Stops node `index` (a primary's slots fail over to its replica).
    pub fn stop(&mut self, index: usize) {
        self.nodes[index].stop();
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_until_ok(&self) -> Result<(), RedisError> {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                n.redis_cli(&["cluster", "info"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            }) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(RedisError::NotReady(
            "the cluster did not reach cluster_state:ok".into(),
        ))
    }
}

/// A primary, its replicas, and three sentinels watching it as `mymaster` (quorum 2, down
/// after one second): stop the primary and a replica is promoted within a few seconds.
#[derive(Debug)]
pub struct RedisSentinel {
    servers: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl RedisSentinel {
    /// The name the sentinels know the primary by.
    pub const MASTER: &'static str = "mymaster";

    /// Starts a primary and `replicas` replicas, all with these extra arguments, then three
    /// sentinels (given `password`, when there is one, to speak to the servers).
    pub fn start(
        replicas: usize,
        args: &[&str],
        password: Option<&str>,
    ) -> Result<Self, RedisError> {
        Self::launch(replicas, args, password, None)
    }

    /// As [`start`](Self::start), everything also taking TLS connections with `tls`'s server
    /// certificate, replicas and sentinels speaking TLS to the primary: the sentinels name
    /// the primary's TLS port.
    pub fn start_tls(
        replicas: usize,
        tls: &TlsFiles,
        args: &[&str],
        password: Option<&str>,
    ) -> Result<Self, RedisError> {
        Self::launch(replicas, args, password, Some(tls))
    }

    fn launch(
        replicas: usize,
        args: &[&str],
        password: Option<&str>,
        tls: Option<&TlsFiles>,
    ) -> Result<Self, RedisError> {
        let mut primary_args = vec!["--repl-diskless-sync-delay", "0"];
        if tls.is_some() {
            primary_args.extend(["--tls-replication", "yes"]);
        }
        primary_args.extend_from_slice(args);
        let start = |args: &[&str]| match tls {
            Some(tls) => RedisServer::start_tls(tls, args),
            None => RedisServer::start_with(args),
        };
        let primary = start(&primary_args)?;
        // Replicas and sentinels reach the primary by the port its clients use.
        let primary_port = primary.tls_port.unwrap_or(primary.port);
        let replica_of = primary_port.to_string();
        let mut servers = vec![primary];
        for _ in 0..replicas {
            let mut replica_args = vec!["--replicaof", "127.0.0.1", &replica_of];
            replica_args.extend_from_slice(&primary_args);
            servers.push(start(&replica_args)?);
        }
        wait_for_replicas(&servers)?;
        let auth = password
            .map(|p| format!("sentinel auth-pass {} {p}", Self::MASTER))
            .unwrap_or_default();
        let sentinels = (0..3)
            .map(|_| RedisServer::start_sentinel(Self::MASTER, primary_port, &auth, tls))
            .collect::<Result<Vec<_>, _>>()?;
        let set = Self { servers, sentinels };
        // Ready once every sentinel has seen every replica (else it could not promote one).
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            let seen = set.sentinels.iter().all(|s| {
                s.redis_cli(&["sentinel", "replicas", Self::MASTER])
                    .is_some_and(|out| out.matches("slave").count() >= replicas)
            });
            if seen {
                return Ok(set);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(RedisError::NotReady(
            "the sentinels did not see every replica".into(),
        ))
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The sentinels' TLS URLs, for a set started with [`start_tls`](Self::start_tls).
    pub fn sentinel_tls_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .filter_map(RedisServer::tls_url)
            .collect()
    }

    /// The data servers, the first started as the primary.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// The port of the primary the sentinels name now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = self
            .sentinels
            .iter()
            .filter(|s| s.is_running())
            .find_map(|s| s.redis_cli(&["sentinel", "get-master-addr-by-name", Self::MASTER]))?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Stops the data server on `port` (plain or TLS).
    pub fn stop_server(&mut self, port: u16) {
        if let Some(server) = self
            .servers
            .iter_mut()
            .find(|s| s.port == port || s.tls_port == Some(port))
        {
            server.stop();
        }
    }
}

/// A certificate authority and a server certificate for `127.0.0.1` it signed, made with the
/// `openssl` command in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct TlsFiles {
    dir: PathBuf,
    /// The authority's certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes the files.
    pub fn generate() -> Result<Self, RedisError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "moat-tls-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(RedisError::Io)?;
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")
            .map_err(RedisError::Io)?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let steps: [&[&str]; 3] = [
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=moat test CA",
                ],
            ]
            .concat(),
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .map_err(RedisError::Io)?;
            if !out.status.success() {
                return Err(RedisError::NotReady(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        Ok(Self {
            ca: dir.join("ca.crt"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            dir,
        })
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until every replica among `servers` has finished its first sync (a replica that has
/// not cannot be promoted).
fn wait_for_replicas(servers: &[RedisServer]) -> Result<(), RedisError> {
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
        let synced = servers.iter().all(|s| {
            s.redis_cli(&["info", "replication"]).is_some_and(|info| {
                info.contains("role:master") || info.contains("master_link_status:up")
            })
        });
        if synced {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(RedisError::NotReady("the replicas did not sync".into()))
}

/// Every command some Redis servers run while it watches (`redis-cli MONITOR` on each), each
/// as its arguments (`["EVALSHA", sha, "1", key, ...]`), for tests and benchmarks that check
/// what a client really sent.
#[derive(Debug)]
pub struct Monitor {
    watchers: Vec<Watcher>,
}

#[derive(Debug)]
struct Watcher {
    port: u16,
    password: Option<String>,
    child: Child,
    lines: std::thread::JoinHandle<Vec<Vec<String>>>,
}

/// Echoed to every watched server at the end: its arrival means everything before it is seen.
const MONITOR_END: &str = "moat-monitor-end";

impl Monitor {
    /// Starts watching the servers on `ports` (with `password`, if they want one); returns
    /// once every one of them is being watched.
    pub fn start(ports: &[u16], password: Option<&str>) -> Result<Self, RedisError> {
        use std::io::{BufRead, BufReader};
        let mut watchers = Vec::new();
        for &port in ports {
            let mut cli = Command::new("redis-cli");
            cli.args(["-p", &port.to_string(), "monitor"]);
            if let Some(password) = password {
                cli.env("REDISCLI_AUTH", password);
            }
            let mut child = cli
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(RedisError::Io)?;
            let mut reader = BufReader::new(child.stdout.take().expect("piped"));
            let mut ok = String::new();
            reader.read_line(&mut ok).map_err(RedisError::Io)?;
            let lines = std::thread::spawn(move || {
                reader
                    .lines()
                    .map_while(Result::ok)
                    .take_while(|line| !line.contains(MONITOR_END))
                    .map(|line| monitor_args(&line))
                    .collect()
            });
            watchers.push(Watcher {
                port,
                password: password.map(str::to_owned),
                child,
                lines,
            });
        }
        Ok(Self { watchers })
    }

    /// Stops watching: what each server ran meanwhile, by port.
    pub fn finish(self) -> Vec<(u16, Vec<Vec<String>>)> {
        self.watchers
            .into_iter()
            .map(|mut w| {
                let mut echo = Command::new("redis-cli");
                echo.args(["-p", &w.port.to_string(), "echo", MONITOR_END]);
                if let Some(password) = &w.password {
                    echo.env("REDISCLI_AUTH", password);
                }
                let _ = echo.output();
                let commands = w.lines.join().unwrap_or_default();
                let _ = w.child.kill();
                let _ = w.child.wait();
                (w.port, commands)
            })
            .collect()
    }
}

/// The quoted arguments of one `MONITOR` line: `1.2 [0 127.0.0.1:5] "EVALSHA" "ab" "1"`.
fn monitor_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut arg = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        arg.push(char::from(u8::from_str_radix(&hex, 16).unwrap_or(b'?')));
                    }
                    Some(other) => arg.push(other),
                    None => {}
                },
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    args
}

/// The value after `--requirepass` in `args`.
fn password_in<'a>(args: &[&'a str]) -> Option<&'a str> {
    args.windows(2)
        .find(|pair| pair[0] == "--requirepass")
        .map(|pair| pair[1])
}

impl RedisServer {
    /// What `redis-cli` prints for this command on this server (with the password from
    /// `--requirepass`, if it was started with one), or `None` if it failed.
    fn redis_cli(&self, command: &[&str]) -> Option<String> {
        let mut cli = Command::new("redis-cli");
        cli.args(["-p", &self.port.to_string()]).args(command);
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if let Some(password) = password_in(&args) {
            cli.env("REDISCLI_AUTH", password);
        }
        let out = cli.stdin(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
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
    // A server that wants a password answers `-NOAUTH ...`: up all the same.
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
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
