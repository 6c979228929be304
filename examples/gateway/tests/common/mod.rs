//! What the gateway's test binaries share: running the real binary and signalling it.

#![allow(dead_code)] // each test binary uses what it needs

/// The gateway binary cargo built for these tests.
pub(crate) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_moat-gateway")
}

/// Runs the gateway binary with `args` (its logs at info on a piped stderr when `logs`, else
/// dropped) and returns it with the URL it prints that it listens on.
pub(crate) async fn run_binary(args: &[&str], logs: bool) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stderr = if logs {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    let mut child = tokio::process::Command::new(binary())
        .args(args)
        .env("RUST_LOG", "moat::gateway=info")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = stdout
            .next_line()
            .await
            .unwrap()
            .expect("the gateway prints where it listens");
        if let Some(rest) = line.strip_prefix("listening on ") {
            break rest.to_owned();
        }
    };
    // Keep reading: the gateway prints more, and a closed pipe would make that fail.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    (child, url)
}

/// Sends `signal` (`HUP`, `TERM`) with the `kill` command, so the tests need no unsafe code.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
