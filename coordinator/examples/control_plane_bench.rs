//! Control-plane scale benchmark: thousands of simulated workers against one coordinator (another process).
//!
//! Every simulated worker is a tokio task with its own `Client`; the clients share `--channels` HTTP/2
//! connections. All register at once (the rendezvous time is from the first call to the last answer); then each
//! sends a heartbeat and asks for its next step's data plan once a second (phases spread over the second, as
//! independent workers would be) for `--seconds`. Prints the latency percentiles as JSON.
//!
//! Usage: control_plane_bench --coordinator http://127.0.0.1:PORT [--workers 4096] [--channels 16] [--seconds 30]

use std::sync::Arc;
use std::time::{Duration, Instant};

use m3d_coordinator::{Client, WorkerInfo};
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let token = std::env::var("M3D_TOKEN")
        .ok()
        .as_deref()
        .and_then(m3d_coordinator::Token::new);
    let mut clients = Vec::new();
    for _ in 0..args.channels.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(args.coordinator.clone())?
            .tcp_nodelay(true)
            .buffer_size(args.workers)
            .connect()
            .await?;
        clients.push(Client::from_channel(
            &args.coordinator,
            channel,
            token.clone(),
        )?);
    }

    // Rendezvous: every worker waits in Register until the round is formed.
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let w = WorkerInfo {
                worker_id: format!("sim-{i:05}"),
                host: format!("node-{:04}", i / 8),
                collective_addr: format!("10.0.{}.{}:29500", i / 256, i % 256),
                gpus: 8,
                nccl_unique_id: Vec::new(),
            };
            let a = c.register(&w).await;
            (w.worker_id, a, t0.elapsed())
        }));
    }
    let mut members = Vec::with_capacity(args.workers);
    let mut register_lat = Vec::with_capacity(args.workers);
    for t in tasks {
        let (id, a, at) = t.await?;
        let a = a?;
        register_lat.push(at.as_micros() as u64);
        members.push((id, a.generation, a.world_size));
    }
    let rendezvous = t0.elapsed();
    let world = members.first().map_or(0, |m| m.2);
    eprintln!(
        "rendezvous of {} workers (world size {world}) in {rendezvous:.2?}",
        members.len()
    );

    // Steady state: 1 Hz heartbeat + data-plan request per worker.
    let hb_lat = Arc::new(Mutex::new(Vec::new()));
    let plan_lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let n = members.len();
    let run_for = Duration::from_secs(args.seconds);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, (id, generation, _)) in members.into_iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let (hb_lat, plan_lat, errors) = (hb_lat.clone(), plan_lat.clone(), errors.clone());
        let first_error = first_error.clone();
        let note = move |e: m3d_coordinator::ClientError| {
            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut f) = first_error.lock() {
                f.get_or_insert_with(|| e.to_string());
            }
        };
        tasks.push(tokio::spawn(async move {
            let offset = Duration::from_secs(1).mul_f64(i as f64 / n as f64);
            let mut tick = tokio::time::interval_at(start + offset, Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut hbs, mut plans) = (Vec::new(), Vec::new());
            let mut step = 0u64;
            while start.elapsed() < run_for {
                tick.tick().await;
                let t = Instant::now();
                match c.heartbeat(&id, generation).await {
                    Ok(h) if h.action == m3d_coordinator::WorkerAction::Continue => {
                        hbs.push(t.elapsed().as_micros() as u64)
                    }
                    Ok(h) => note(m3d_coordinator::ClientError::Invalid {
                        url: String::new(),
                        reason: format!("heartbeat answered {:?}", h.action),
                    }),
                    Err(e) => note(e),
                }
                let t = Instant::now();
                match c.data_plan(&id, generation, step, 1).await {
                    Ok(_) => plans.push(t.elapsed().as_micros() as u64),
                    Err(e) => note(e),
                }
                step += 1;
            }
            hb_lat.lock().await.extend(hbs);
            plan_lat.lock().await.extend(plans);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed();
    let hb = std::mem::take(&mut *hb_lat.lock().await);
    let plans = std::mem::take(&mut *plan_lat.lock().await);
    let total = hb.len() + plans.len();
    let mut all: Vec<u64> = hb.iter().chain(plans.iter()).copied().collect();
    all.sort_unstable();
    let report = serde_json::json!({
        "workers": n,
        "world_size": world,
        "channels": clients.len(),
        "rendezvous_s": rendezvous.as_secs_f64(),
        "register": summary(register_lat),
        "heartbeat": summary(hb),
        "data_plan": summary(plans),
        "all": summary(all),
        "requests_per_s": total as f64 / elapsed.as_secs_f64(),
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "first_error": first_error.lock().ok().and_then(|f| f.clone()),
        "seconds": elapsed.as_secs_f64(),
    });
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
