//! Control-plane scale benchmark: thousands of simulated workers against one coordinator (another process),
//! doing what real workers do (`m3d_worker::role`).
//!
//! Every simulated worker is a tokio task with its own `Client`; the clients share `--channels` HTTP/2
//! connections. All register at once (the rendezvous time is from the first call to the last answer) and take
//! their ring neighbours and rank 0's NCCL id from the answer — nobody fetches the member list, nobody asks for
//! a data plan (workers compute their samples from the plan spec). Then, for `--seconds`, each sends a
//! heartbeat at the interval the coordinator asked for (phases spread over the interval, as independent
//! workers would be), and rank 0 alone reports its progress once a second; at the end every rank reports the
//! last step once (which completes the job), as at the end of a round. Prints latency percentiles and the bytes
//! on the wire per worker (counted on the connections, both directions, HTTP/2 framing included) as JSON.
//!
//! Usage: control_plane_bench --coordinator http://127.0.0.1:PORT [--workers 4096] [--channels 16] [--seconds 30]

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use m3d_coordinator::{Client, Progress, WorkerAction, WorkerInfo, PROGRESS_EVERY};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;

struct Args {
    coordinator: String,
    workers: usize,
    channels: usize,
    seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        coordinator: String::new(),
        workers: 4096,
        channels: 16,
        seconds: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--coordinator" => a.coordinator = value.clone(),
            "--workers" => a.workers = num()? as usize,
            "--channels" => a.channels = num()? as usize,
            "--seconds" => a.seconds = num()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.coordinator.is_empty() {
        return Err("--coordinator URL is required".into());
    }
    Ok(a)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn summary(mut v: Vec<u64>) -> serde_json::Value {
    v.sort_unstable();
    serde_json::json!({
        "count": v.len(),
        "p50_ms": percentile(&v, 0.50),
        "p99_ms": percentile(&v, 0.99),
        "max_ms": percentile(&v, 1.0),
    })
}

/// Bytes written to and read from the coordinator over all connections.
#[derive(Default)]
struct Wire {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Wire {
    fn now(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// A TCP stream that counts its bytes into a [`Wire`].
struct Counted {
    tcp: tokio::net::TcpStream,
    wire: Arc<Wire>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.wire.received.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.wire.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Per-worker bytes of a phase, from two readings of the counters.
fn per_worker(from: (u64, u64), to: (u64, u64), workers: usize) -> serde_json::Value {
    let n = workers.max(1) as f64;
    serde_json::json!({
        "sent": (to.0 - from.0) as f64 / n,
        "received": (to.1 - from.1) as f64 / n,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let token = std::env::var("M3D_TOKEN")
        .ok()
        .as_deref()
        .and_then(m3d_coordinator::Token::new);
    let wire = Arc::new(Wire::default());
    let mut clients = Vec::new();
    for _ in 0..args.channels.max(1) {
        let w = wire.clone();
        let connector = tower::service_fn(move |uri: tonic::transport::Uri| {
            let wire = w.clone();
            async move {
                let host = uri.host().unwrap_or("127.0.0.1").to_string();
                let port = uri.port_u16().unwrap_or(80);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Counted { tcp, wire }))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(args.coordinator.clone())?
            .buffer_size(args.workers)
            .connect_with_connector(connector)
            .await?;
        clients.push(Client::from_channel(
            &args.coordinator,
            channel,
            token.clone(),
        )?);
    }
    let connected = wire.now();

    // Rendezvous: every worker waits in Register until the round is formed; the answer is all it needs.
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let w = WorkerInfo {
                worker_id: format!("sim-{i:05}"),
                host: format!("node-{:04}", i / 8),
                collective_addr: format!("10.{}.{}.{}:29500", i / 65536, (i / 256) % 256, i % 256),
                gpus: 8,
                nccl_unique_id: vec![i as u8; 128],
            };
            let a = c.register(&w).await;
            (w.worker_id, a, t0.elapsed())
        }));
    }
    let mut members = Vec::with_capacity(args.workers);
    let mut register_lat = Vec::with_capacity(args.workers);
    let mut neighbours_ok = true;
    for t in tasks {
        let (id, a, at) = t.await?;
        let a = a?;
        register_lat.push(at.as_micros() as u64);
        // What the ring needs: both neighbours (one with 2 ranks); NCCL: rank 0's id.
        let want = (a.world_size as usize - 1).min(2);
        neighbours_ok &= a.peers.len() == want && a.nccl_unique_id.len() == 128;
        members.push((id, a));
    }
    let rendezvous = t0.elapsed();
    let registered = wire.now();
    let world = members.first().map_or(0, |m| m.1.world_size);
    let total_steps = members.first().map_or(0, |m| m.1.plan.total_steps());
    let interval = members
        .first()
        .map_or(Duration::from_secs(1), |m| m.1.heartbeat_interval);
    eprintln!(
        "rendezvous of {} workers (world size {world}) in {rendezvous:.2?}; heartbeats every {interval:?}",
        members.len()
    );

    // Steady state: heartbeats at the coordinator's interval; rank 0 reports progress every PROGRESS_EVERY.
    let hb_lat = Arc::new(Mutex::new(Vec::new()));
    let progress_lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let n = members.len();
    let run_for = Duration::from_secs(args.seconds);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, (id, a)) in members.iter().cloned().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let (hb_lat, progress_lat, errors) = (hb_lat.clone(), progress_lat.clone(), errors.clone());
        let first_error = first_error.clone();
        let note = move |e: String| {
            errors.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut f) = first_error.lock() {
                f.get_or_insert(e);
            }
        };
        tasks.push(tokio::spawn(async move {
            let every = if a.rank == 0 {
                PROGRESS_EVERY.min(interval)
            } else {
                interval
            };
            let offset = interval.mul_f64(i as f64 / n as f64);
            let mut tick = tokio::time::interval_at(start + offset, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut hbs, mut reports) = (Vec::new(), Vec::new());
            let mut last_beat: Option<tokio::time::Instant> = None;
            let mut step = 0u64;
            while start.elapsed() < run_for {
                tick.tick().await;
                if last_beat.is_none_or(|b| b.elapsed() + every / 2 >= interval) {
                    last_beat = Some(tokio::time::Instant::now());
                    let t = Instant::now();
                    match c.heartbeat(&id, a.generation).await {
                        Ok(h) if h.action == WorkerAction::Continue => {
                            hbs.push(t.elapsed().as_micros() as u64)
                        }
                        Ok(h) => note(format!("heartbeat answered {:?}", h.action)),
                        Err(e) => note(e.to_string()),
                    }
                }
                if a.rank == 0 {
                    step = (step + 1).min(total_steps.saturating_sub(1));
                    let t = Instant::now();
                    let p = Progress {
                        step,
                        loss: 1.0,
                        samples: step * a.plan.global_batch,
                    };
                    match c.report_progress(&id, a.generation, p).await {
                        Ok(_) => reports.push(t.elapsed().as_micros() as u64),
                        Err(e) => note(e.to_string()),
                    }
                }
            }
            hb_lat.lock().await.extend(hbs);
            progress_lat.lock().await.extend(reports);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed();
    let steady = wire.now();

    // The end of the round: every rank reports the last step once (the job completes with the last one).
    let t1 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, (id, a)) in members.iter().cloned().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let p = Progress {
                step: total_steps,
                loss: 1.0,
                samples: total_steps * a.plan.global_batch,
            };
            c.report_progress(&id, a.generation, p)
                .await
                .map(|_| t.elapsed().as_micros() as u64)
        }));
    }
    let mut final_lat = Vec::with_capacity(n);
    let mut final_errors = 0u64;
    for t in tasks {
        match t.await? {
            Ok(l) => final_lat.push(l),
            Err(_) => final_errors += 1,
        }
    }
    let final_s = t1.elapsed().as_secs_f64();
    let ended = wire.now();
    let phase = clients[0]
        .clone()
        .status()
        .await
        .map(|s| s.phase.to_string());

    let hb = std::mem::take(&mut *hb_lat.lock().await);
    let reports = std::mem::take(&mut *progress_lat.lock().await);
    let total = hb.len() + reports.len();
    let mut all: Vec<u64> = hb.iter().chain(reports.iter()).copied().collect();
    all.sort_unstable();
    let minutes = elapsed.as_secs_f64() / 60.0;
    let steady_bytes = per_worker(registered, steady, n);
    let report = serde_json::json!({
        "workers": n,
        "world_size": world,
        "channels": clients.len(),
        "heartbeat_interval_s": interval.as_secs_f64(),
        "rendezvous_s": rendezvous.as_secs_f64(),
        "register": summary(register_lat),
        "neighbours_and_nccl_id_in_register": neighbours_ok,
        "heartbeat": summary(hb),
        "progress_rank0": summary(reports),
        "all": summary(all),
        "requests_per_s": total as f64 / elapsed.as_secs_f64(),
        "final_report": summary(final_lat),
        "final_report_s": final_s,
        "final_report_errors": final_errors,
        "job_phase_after": phase.unwrap_or_else(|e| e.to_string()),
        "errors": errors.load(Ordering::Relaxed),
        "first_error": first_error.lock().ok().and_then(|f| f.clone()),
        "seconds": elapsed.as_secs_f64(),
        "bytes_per_worker": {
            "connect": per_worker((0, 0), connected, n),
            "rendezvous": per_worker(connected, registered, n),
            "steady_per_minute": {
                "sent": steady_bytes["sent"].as_f64().unwrap_or(0.0) / minutes,
                "received": steady_bytes["received"].as_f64().unwrap_or(0.0) / minutes,
            },
            "final_report": per_worker(steady, ended, n),
        },
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
