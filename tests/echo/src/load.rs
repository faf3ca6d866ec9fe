//! Load generation for benchmarks: each mode runs for a fixed time and prints one JSON object.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MESSAGE: usize = 64;

pub(crate) async fn run(
    addr: &str,
    mode: &str,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<()> {
    let figures = match mode {
        "throughput" => throughput(addr, duration).await?,
        "rr" => request_response(addr, duration, connections).await?,
        "connect" => connect_rate(addr, duration, connections).await?,
        other => anyhow::bail!("unknown load mode {other:?}: expected throughput, rr or connect"),
    };
    println!("{figures}");
    Ok(())
}

/// Greets like the echo server's TCP port does: read the JSON line first.
async fn connect_echo(addr: &str) -> anyhow::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    if reader.read_line(&mut greeting).await? == 0 {
        anyhow::bail!("{addr} closed the connection before answering");
    }
    Ok(reader)
}

async fn throughput(addr: &str, duration: Duration) -> anyhow::Result<serde_json::Value> {
    let mut stream = TcpStream::connect(addr).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < duration {
        stream.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    anyhow::ensure!(
        received == sent,
        "the sink counted {received} bytes of {sent}"
    );
    Ok(json!({"bytes": sent, "seconds": elapsed, "mb_per_s": sent as f64 / elapsed / 1e6}))
}

async fn request_response(
    addr: &str,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let addr = addr.to_string();
        tasks.spawn(async move {
            let mut stream = connect_echo(&addr).await?;
            let message = [0x42u8; MESSAGE];
            let mut reply = [0u8; MESSAGE];
            let mut latencies = Vec::new();
            let start = Instant::now();
            while start.elapsed() < duration {
                let t = Instant::now();
                stream.get_mut().write_all(&message).await?;
                stream.read_exact(&mut reply).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(0.0)
    };
    Ok(
        json!({"requests": all.len(), "per_second": all.len() as f64 / duration.as_secs_f64(), "p50_us": pct(0.5), "p99_us": pct(0.99)}),
    )
}

async fn connect_rate(
    addr: &str,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let addr = addr.to_string();
        tasks.spawn(async move {
            let start = Instant::now();
            let mut made = 0u64;
            while start.elapsed() < duration {
                let stream = connect_echo(&addr).await?;
                drop(stream);
                made += 1;
            }
            anyhow::Ok(made)
        });
    }
    let mut total = 0;
    while let Some(result) = tasks.join_next().await {
        total += result??;
    }
    Ok(json!({"connections": total, "per_second": total as f64 / duration.as_secs_f64()}))
}
