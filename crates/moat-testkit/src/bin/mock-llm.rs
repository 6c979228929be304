//! `mock-llm --listen ADDR [--chunk-chars N] [--chunk-delay-ms N]`: the mock LLM upstream as a
//! server. See `moat_testkit::mock` for its endpoints and fault-injection headers.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use moat_testkit::mock::{MockConfig, MockUpstream};

const USAGE: &str = "usage: mock-llm [--listen ADDR] [--chunk-chars N] [--chunk-delay-ms N]\n\
  --listen ADDR        address to listen on (default 127.0.0.1:8081)\n\
  --chunk-chars N      characters per streamed delta (default 3)\n\
  --chunk-delay-ms N   delay between streamed frames (default 0)";

fn parse() -> Result<(SocketAddr, MockConfig), String> {
    let mut addr: SocketAddr = "127.0.0.1:8081".parse().expect("valid default");
    let mut config = MockConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                addr = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--chunk-chars" => {
                let v = value("--chunk-chars")?;
                config = config
                    .with_chunk_chars(v.parse().map_err(|e| format!("--chunk-chars {v}: {e}"))?);
            }
            "--chunk-delay-ms" => {
                let v = value("--chunk-delay-ms")?;
                let ms = v
                    .parse()
                    .map_err(|e| format!("--chunk-delay-ms {v}: {e}"))?;
                config = config.with_chunk_delay(Duration::from_millis(ms));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((addr, config))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (addr, config) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("mock-llm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let upstream = match MockUpstream::start_with(config, addr).await {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("mock-llm: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    println!("mock-llm listening on {}", upstream.url());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
