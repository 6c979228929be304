//! The `moat-gateway` binary. With no arguments it runs the demo: the built-in mock upstream
//! behind the gateway on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use moat_gateway::config::{Config, Resolved};

/// mimalloc: a request's buffers are allocated on one worker thread and often freed on another,
/// which glibc's allocator handles slowly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An OpenAI-compatible guarded proxy built from the moat layers.
#[derive(Debug, Parser)]
#[command(name = "moat-gateway", version, about)]
struct Args {
    /// Read the configuration from this TOML file (without it: the demo, in front of a built-in
    /// mock upstream).
    #[arg(long, value_name = "FILE", conflicts_with = "check_config")]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit: 0 when valid, 2 when not.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Listen on this address instead of the configured one (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Also reload when the configuration file (or its keys_file) changes, checked every 2 s.
    #[arg(long, requires = "config")]
    watch: bool,
    /// Log lines as text (colours only on a terminal) or as JSON objects, one per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn load(path: &PathBuf, check: bool) -> Result<Resolved, String> {
    let source = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let env = |name: &str| std::env::var(name).ok();
    let resolved = if check {
        Config::check(&source, env)
    } else {
        Config::resolve(&source, env)
    };
    resolved.map_err(|e| format!("{}: {e}", path.display()))
}

/// When the configuration file and its `keys_file` last changed, and their lengths (a change
/// within the file system clock's granularity still shows in the length, mostly).
fn modified(
    running: &Resolved,
    path: &std::path::Path,
) -> Vec<Option<(Option<std::time::SystemTime>, u64)>> {
    let keys = running
        .config
        .keys_file
        .as_ref()
        .map(|f| PathBuf::from(f.get_ref()));
    std::iter::once(path.to_path_buf())
        .chain(keys)
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        })
        .collect()
}

/// Reloads the configuration file on every SIGHUP (and, with `watch`, when it or its keys file
/// changes): a file that does not load is refused (its error logged) and the running
/// configuration keeps serving; one that loads serves every request that arrives after it,
/// with the state of the rules, budgets, vaults and breakers it keeps. `listen` and `[server]`
/// take effect at the next start.
#[cfg(unix)]
fn reload_on_sighup(
    path: PathBuf,
    mut running: Resolved,
    app: moat_gateway::Reloadable,
    watch: bool,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(target: "moat::gateway", error = %e, "cannot listen for SIGHUP: no reloads");
            return;
        }
    };
    // Read now, not when the task first runs: a change made right after startup is a change.
    let mut seen = modified(&running, &path);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                hangup = hangups.recv() => if hangup.is_none() { break },
                _ = ticks.tick(), if watch => {
                    let now = modified(&running, &path);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                }
            }
            let loaded = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|source| {
                    Config::reload(&source, |name| std::env::var(name).ok(), &running)
                        .map_err(|e| e.to_string())
                })
                .and_then(|next| match &next.audit {
                    // An audit log the running configuration did not have starts now.
                    Some(audit) => audit
                        .log()
                        .map(|_| next)
                        .map_err(|e| format!("the audit log cannot start: {e}")),
                    None => Ok(next),
                });
            match loaded {
                Ok(mut next) => {
                    next.config.listen = running.config.listen;
                    if next.server != running.server {
                        tracing::warn!(target: "moat::gateway", "[server] changes take effect at the next start");
                    }
                    app.replace(moat_gateway::app(&next));
                    running = next;
                    seen = modified(&running, &path);
                    tracing::info!(target: "moat::gateway", path = %path.display(), "configuration reloaded");
                }
                Err(error) => {
                    tracing::error!(target: "moat::gateway", path = %path.display(), %error, "configuration not reloaded: the running one keeps serving");
                }
            }
        }
    });
}

/// The demo's mock upstream, serving while the gateway does.
struct Demo {
    url: String,
    /// `moat-audit verify` arguments for the demo's audit log.
    audit: String,
    #[cfg(feature = "demo")]
    _mocks: (
        moat_testkit::mock::MockUpstream,
        moat_testkit::mock::MockUpstream,
    ),
}

/// The demo's configuration, in front of a mock upstream started for it.
#[cfg(feature = "demo")]
async fn start_demo() -> Result<(Resolved, Demo), String> {
    use moat_testkit::mock::{MockConfig, MockUpstream};
    let loopback = "127.0.0.1:0".parse().expect("valid");
    let mock = MockUpstream::start_with(MockConfig::default(), loopback)
        .await
        .map_err(|e| format!("cannot start the mock upstream: {e}"))?;
    // A healthy backup: it ignores the x-mock-* fault headers that make the primary fail.
    let backup = MockUpstream::start_with(MockConfig::default().without_faults(), loopback)
        .await
        .map_err(|e| format!("cannot start the backup mock upstream: {e}"))?;
    let listen = "127.0.0.1:8080".parse().expect("valid");
    // The audit log goes to a fresh directory, its checkpoints signed by a key made for the run.
    let audit_dir = std::env::temp_dir().join(format!("moat-demo-{}", std::process::id()));
    let audit_file = audit_dir.join("moat-audit.jsonl");
    let (signer, audit_key) = moat::audit::Signer::generate("moat-audit/demo")
        .map_err(|e| format!("cannot make the demo's audit key: {e}"))?;
    let resolved =
        moat_gateway::demo::config(&mock.url(), &backup.url(), listen, &audit_file, &audit_key);
    let demo = Demo {
        url: mock.url(),
        audit: format!(
            "{} --checkpoint {} --key {}",
            audit_dir.display(),
            audit_dir.join("moat-audit.checkpoint").display(),
            signer.verifier_key()
        ),
        _mocks: (mock, backup),
    };
    Ok((resolved, demo))
}

/// Without the `demo` feature there is no mock upstream to run in front of.
#[cfg(not(feature = "demo"))]
async fn start_demo() -> Result<(Resolved, Demo), String> {
    Err("built without the demo (feature `demo`): pass --config FILE".into())
}

/// Log lines queued for stderr before new ones are dropped (about 1 MB at most): a healthy
/// stderr drains it at once, and one that stalls should cost lines, not memory.
const LOG_QUEUE_LINES: usize = 4_096;

/// How long the exit waits for the audit log to write what is queued.
const AUDIT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Lines go to stderr from a thread of their own, in batches: a request never waits on a
    // write (or on a slow reader of stderr, which would otherwise stall the workers). When the
    // queue is full, lines are dropped rather than requests held. Flushed when `_log_guard`
    // drops at the end of `main`.
    let (log_writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("moat-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let dropped = log_writer.error_counter();
    moat_gateway::observe::count_dropped_log_lines(move || dropped.dropped_lines());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(log_writer);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    // Before any layer is built: layers take their metric handles then.
    if moat_gateway::observe::install_metrics().is_none() {
        tracing::warn!(target: "moat::gateway", "metrics recorder not installed: /metrics is off");
    }

    if let Some(path) = &args.check_config {
        return match load(path, true) {
            Ok(resolved) => {
                for warning in &resolved.warnings {
                    eprintln!("moat-gateway: warning: {}: {warning}", path.display());
                }
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("moat-gateway: invalid configuration: {e}");
                ExitCode::from(2)
            }
        };
    }

    let (mut resolved, demo) = match &args.config {
        Some(path) => match load(path, false) {
            Ok(resolved) => (resolved, None),
            Err(e) => {
                eprintln!("moat-gateway: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
        None => match start_demo().await {
            Ok((resolved, demo)) => (resolved, Some(demo)),
            Err(e) => {
                eprintln!("moat-gateway: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    if let Some(listen) = args.listen {
        resolved.config.listen = listen;
    }
    let listener = match tokio::net::TcpListener::bind(resolved.config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "moat-gateway: cannot listen on {}: {e}",
                resolved.config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let audit = resolved.audit.clone();
    if let Some(audit) = &audit {
        if let Err(e) = audit.log() {
            eprintln!(
                "moat-gateway: the audit log cannot start at {}: {e}",
                audit.file()
            );
            return ExitCode::FAILURE;
        }
    }
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    if let Some(demo) = &demo {
        println!(
            "moat-gateway demo: in-memory state, built-in mock upstream at {}/v1",
            demo.url
        );
        println!("audit log: moat-audit verify {}", demo.audit);
    } else {
        for upstream in &resolved.upstreams {
            println!(
                "moat-gateway: upstream {} at {}",
                upstream.name, upstream.base_url
            );
        }
    }
    let app = moat_gateway::Reloadable::new(moat_gateway::app(&resolved));
    let limits = resolved.server;
    #[cfg(unix)]
    if let Some(path) = &args.config {
        reload_on_sighup(path.clone(), resolved, app.clone(), args.watch);
    }
    // Ready before saying so: a reload asked for (SIGHUP) or a file changed after this line is
    // seen.
    println!("listening on http://{addr}");
    if demo.is_some() {
        println!("try:\n  curl http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello from moat\"}}]}}'");
    }
    let served = moat_gateway::serve(
        listener,
        app.router(),
        limits,
        moat_gateway::shutdown_signal(),
    )
    .await;
    // In-flight requests are done: every record is written, with a last checkpoint (a sink
    // that stays down does not hold the exit forever).
    for log in moat_gateway::audit::take_started() {
        match tokio::time::timeout(AUDIT_SHUTDOWN, log.shutdown()).await {
            Ok(Ok(head)) => {
                tracing::info!(target: "moat::gateway", records = head.next_seq, "audit log flushed")
            }
            Ok(Err(error)) => {
                tracing::error!(target: "moat::gateway", %error, "the audit log could not be flushed")
            }
            Err(_) => {
                tracing::error!(target: "moat::gateway", "the audit log was not flushed within {AUDIT_SHUTDOWN:?}: records still queued are lost")
            }
        }
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
