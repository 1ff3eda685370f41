//! M3D-Bench as a job of the coordinator (`m3d eval bench --serve` / `--coordinator`, and what `--workers N`
//! runs on one machine): the coordinator forms the round (each rank's number and the world size), watches the
//! ranks' heartbeats, and completes the job once every rank has written its results; rank 0 of the last round
//! then merges them into the report.
//!
//! The plan is [`m3d_coordinator::PlanKind::Eval`]: the evaluation's work items (each task's samples in the fixed order of
//! [`crate::bench`], then retrieval as one item) as one in-order pass, which the ranks lease from the
//! coordinator a batch at a time (`LeaseWork`, [`crate::bench::Share::Leased`]): a rank that is faster, started
//! sooner or drew shorter answers takes more, so no rank idles at the end while another finishes a fixed slice
//! (answers stop at EOS, so equal item counts are not equal work). The coordinator counts the items from the
//! datasets' manifests alone ([`EvalPlan::of`]); each rank checks
//! them against its sample tables. Every rank and the coordinator must evaluate the same thing, so the plan
//! carries the evaluation's settings (datasets, tasks, split, limit, model, decoding and scoring) and a rank whose
//! own differ refuses, naming the flag and both values.
//!
//! A rank that fails (or stops heartbeating) breaks the round: the others stop their slice and register again,
//! and the coordinator forms a restart round over the survivors (within `--min-workers` and `--restarts`), whose
//! ranks lease the whole pass again but evaluate only the items no finished result file covers (each batch's
//! file is in the output, the store included, before the batch counts as done). Results depend only on the
//! sample, so the report is the same whichever round wrote it. The output's `parts/` belongs to the job: a
//! job that starts afresh (no saved coordinator state) clears it first ([`crate::output::BenchOut::clear_parts`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use m3d_coordinator::client::{spawn_heartbeats, Client};
use m3d_coordinator::{JobPhase, PlanSpec, Progress, Token, WorkerAction, WorkerInfo};
use m3d_infer::LamedModel;
use m3d_instruct::bench::BenchTask;
use m3d_shards::Task;
use m3d_worker::role::patiently;

use crate::bench::{accepts, merge, run_rank, BenchOptions, BenchReport, Share};
use crate::output::{BenchOut, REPORT};
use crate::EvalError;

/// How long a finished rank waits for a coordinator that does not answer before giving up.
const WAIT_PATIENCE: Duration = Duration::from_secs(60);

/// What the coordinator and every rank must agree on.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPlan {
    /// [`m3d_coordinator::PlanKind::Eval`] over the evaluation's work items, `seed` being `--seed`.
    pub plan: PlanSpec,
    /// `flag=value` lines, sorted: `data` (sha256 over the shard listings of `--data` and `--volumes`),
    /// `tasks`, `split`, `limit`, `model`, `max-new-tokens`, `scoring`, `wordnet`, `bertscore`, `clip`,
    /// `overlays`. Sent as the plan's `data_fingerprint`.
    pub settings: String,
}

impl EvalPlan {
    /// The plan of evaluating `model` (as named on the command line) on the datasets `data` (with `volumes`)
    /// under `opts`, from their manifests (one read each: no sample table or volume is read).
    pub fn of(
        model: &str,
        data: &[String],
        volumes: &[String],
        opts: &BenchOptions,
    ) -> Result<EvalPlan, EvalError> {
        opts.check()?;
        let mut listing = String::new();
        let mut manifests = Vec::new();
        for (role, url) in data
            .iter()
            .map(|u| ("data", u))
            .chain(volumes.iter().map(|u| ("volumes", u)))
        {
            let m = m3d_coordinator::dataset_manifest(url)
                .map_err(|e| EvalError::Input(e.to_string()))?;
            listing.push_str(&format!("{role}\n"));
            m3d_coordinator::shard_listing(&m, &mut listing);
            if role == "data" {
                manifests.push(m);
            }
        }
        let mut items = 0u64;
        for &task in &opts.tasks {
            if task == BenchTask::Retrieval {
                continue;
            }
            let n: u64 = manifests
                .iter()
                .flat_map(|m| m.counts.iter())
                .filter(|(stored, _)| {
                    stored
                        .parse::<Task>()
                        .is_ok_and(|stored| accepts(task, stored))
                })
                .filter_map(|(_, splits)| splits.get(&opts.split))
                .sum();
            if n == 0 {
                return Err(EvalError::Input(format!(
                    "task `{task}`: no `{}` sample in {data:?}",
                    opts.split
                )));
            }
            items += opts.limit.map_or(n, |l| n.min(l as u64));
        }
        if opts.tasks.contains(&BenchTask::Retrieval) {
            items += 1;
        }
        let tasks: Vec<String> = opts.tasks.iter().map(|t| t.to_string()).collect();
        let path_or_none =
            |p: Option<&Path>| p.map_or("none".to_string(), |p| p.display().to_string());
        let settings: BTreeMap<&str, String> = BTreeMap::from([
            ("data", m3d_shards::sha256_hex(listing.as_bytes())),
            ("tasks", tasks.join(",")),
            ("split", opts.split.clone()),
            ("limit", opts.limit.map_or("none".into(), |l| l.to_string())),
            ("model", model.to_string()),
            ("max-new-tokens", opts.max_new_tokens.to_string()),
            ("scoring", format!("{:?}", opts.convention).to_lowercase()),
            ("wordnet", path_or_none(opts.wordnet.as_deref())),
            (
                "bertscore",
                match &opts.bertscore {
                    Some((dir, layer)) => format!(
                        "{} layer {}",
                        dir.display(),
                        layer.map_or("default".into(), |l| l.to_string())
                    ),
                    None => "none".into(),
                },
            ),
            ("clip", path_or_none(opts.clip.as_deref())),
            ("overlays", opts.overlays.to_string()),
        ]);
        let settings = settings.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Ok(EvalPlan {
            plan: PlanSpec::evaluation(items, opts.seed),
            settings,
        })
    }

    /// Every difference between the coordinator's plan (`theirs`, with the settings it sent) and this one, as
    /// "the coordinator's --F is X, this rank's is Y".
    pub fn mismatches(&self, theirs: &PlanSpec, their_settings: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |field: &str, c: String, w: String| {
            if c != w {
                out.push(format!(
                    "the coordinator's {field} is {c}, this rank's is {w}"
                ));
            }
        };
        cmp("job", theirs.kind.to_string(), self.plan.kind.to_string());
        cmp(
            "work items (samples of every task)",
            theirs.samples.to_string(),
            self.plan.samples.to_string(),
        );
        cmp(
            "--seed",
            theirs.seed.to_string(),
            self.plan.seed.to_string(),
        );
        let parse = |s: &str| -> BTreeMap<String, String> {
            s.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (c, w) = (
            parse(their_settings.unwrap_or_default()),
            parse(&self.settings),
        );
        let keys: std::collections::BTreeSet<&String> = c.keys().chain(w.keys()).collect();
        for k in keys {
            let get = |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or("unset".into());
            let field = match k.as_str() {
                "data" => "data (sha256 over the shards of --data and --volumes)".to_string(),
                k => format!("--{k}"),
            };
            cmp(&field, get(&c), get(&w));
        }
        out
    }
}

/// How a rank reaches the coordinator.
#[derive(Clone, Debug)]
pub struct RankOptions {
    /// The coordinator's URL (`http://host:port`).
    pub coordinator: String,
    pub token: Option<Token>,
    /// Stable, unique name of this rank's process (a pod name).
    pub worker_id: String,
    pub host: String,
}

/// Runs one rank of the evaluation job at `rank_opts.coordinator`: registers, checks the plan against `plan`
/// (this rank's own), evaluates its slice into `out` (shared by every rank: a folder they all see, or a store
/// folder; results meet there), reports it done, and waits for the job to end; rank 0 of the last round then
/// merges the report, which it returns. `progress(done, all)` is called after each batch.
#[allow(clippy::too_many_arguments)]
pub fn run_rank_of_job(
    model: &LamedModel,
    model_label: &str,
    data: &[String],
    volumes: &[String],
    opts: &BenchOptions,
    plan: &EvalPlan,
    out: &BenchOut,
    rank_opts: &RankOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Option<BenchReport>, EvalError> {
    let url = rank_opts.coordinator.as_str();
    let id = rank_opts.worker_id.as_str();
    let control = |e: m3d_coordinator::client::ClientError| EvalError::Control(e.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("m3d-eval-control")
        .build()
        .map_err(|e| EvalError::Control(format!("starting the control runtime: {e}")))?;
    let client = patiently(&rt, id, "connect", || {
        Client::connect(url, rank_opts.token.clone())
    })
    .map_err(control)?;
    let info = WorkerInfo {
        worker_id: id.to_string(),
        host: rank_opts.host.clone(),
        collective_addr: String::new(),
        gpus: u32::from(model.device().is_cuda()),
        nccl_unique_id: Vec::new(),
    };
    loop {
        let a = match patiently(&rt, id, "register", || {
            let mut c = client.clone();
            let info = info.clone();
            async move { c.register(&info).await }
        }) {
            Ok(a) => a,
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        m3d_coordinator::Code::FailedPrecondition | m3d_coordinator::Code::Aborted
                    )
                ) =>
            {
                // The job is over, or a round is running without this rank (it joins the next one).
                let status = patiently(&rt, id, "job status", || {
                    let mut c = client.clone();
                    async move { c.status().await }
                })
                .map_err(control)?;
                if status.phase.is_final() {
                    return Err(EvalError::Control(format!(
                        "the evaluation job at {url} is over ({}) without this rank",
                        status.phase
                    )));
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(control(e)),
        };
        let mismatches = plan.mismatches(&a.plan, a.data_fingerprint.as_deref());
        if !mismatches.is_empty() {
            return Err(EvalError::Control(format!(
                "refusing the evaluation of the coordinator at {url}: {}; start the coordinator and every rank with the same flags and data",
                mismatches.join("; ")
            )));
        }
        let heartbeats = {
            let _guard = rt.enter();
            spawn_heartbeats(
                client.clone(),
                id.to_string(),
                a.generation,
                a.heartbeat_interval,
            )
        };
        let round_over = || *heartbeats.actions.borrow() != WorkerAction::Continue;
        // A heartbeat answered "stop": the job ended (a peer failed beyond the restart budget). Its status is
        // fetched at once, while the coordinator still serves (it waits for every rank to have heard, then
        // a short grace), not at this rank's next batch boundary, which may come after it has exited.
        let watcher = {
            let mut actions = heartbeats.actions.clone();
            let mut c = client.clone();
            rt.spawn(async move {
                actions.wait_for(|a| *a == WorkerAction::Stop).await.ok()?;
                c.status().await.ok()
            })
        };
        let mut o = opts.clone();
        o.rank = a.rank as usize;
        o.world = a.world_size as usize;
        o.planned_items = Some(a.plan.samples);
        let generation = a.generation;
        // The end of the furthest range handed to this rank in this round.
        let mut high_water = 0;
        let mut lease = |max: usize| {
            if round_over() {
                return Err(EvalError::Interrupted(format!(
                    "round {generation} ended by the coordinator"
                )));
            }
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            match patiently(&rt, id, "lease work", || {
                let mut c = client.clone();
                async move { c.lease_work(id, generation, max).await }
            }) {
                Ok(l) => {
                    if l.start < high_water {
                        // A coordinator restarted mid-round hands the pass out again: fetch the result files
                        // the other ranks have finished since, which `run_rank` then skips.
                        out.download_parts()?;
                    }
                    high_water = high_water.max(l.end);
                    Ok(l.start..l.end)
                }
                // A round that has ended (a peer failed): this rank registers again.
                Err(e) if e.round_over() => Err(EvalError::Interrupted(e.to_string())),
                Err(e) => Err(control(e)),
            }
        };
        // The result files earlier rounds finished (every rank's, a failed one's included): this round skips
        // their items.
        out.download_parts()?;
        let done = run_rank(
            model,
            data,
            volumes,
            &o,
            out.dir(),
            Share::Leased(&mut lease),
            |done, all| {
                // Each finished batch goes to the store at once, so that it outlives this rank.
                out.upload_all()?;
                progress(done, all);
                if round_over() {
                    return Err(EvalError::Interrupted(format!(
                        "round {} ended by the coordinator",
                        a.generation
                    )));
                }
                Ok(())
            },
        );
        match done {
            Ok(_) => {}
            Err(EvalError::Interrupted(_))
                if *heartbeats.actions.borrow() == WorkerAction::Stop =>
            {
                // The fetch started when the heartbeat heard "stop"; it may still be on its way.
                let status = rt
                    .block_on(async { tokio::time::timeout(Duration::from_secs(5), watcher).await })
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                return Err(EvalError::Control(match status {
                    Some(s) => format!(
                        "the evaluation job at {url} {}: {}",
                        s.phase,
                        s.failure.unwrap_or_default()
                    ),
                    None => format!("the evaluation job at {url} has ended without this rank"),
                }));
            }
            Err(EvalError::Interrupted(why)) => {
                watcher.abort();
                tracing::info!(worker = id, reason = %why, "registering again");
                continue;
            }
            Err(e) => return Err(e),
        }
        watcher.abort();
        // In the store before the slice counts as done: a completed job has every part.
        out.upload_all()?;
        patiently(&rt, id, "report", || {
            let mut c = client.clone();
            let p = Progress {
                step: 1,
                loss: 0.0,
                samples: a.plan.samples,
            };
            async move { c.report_progress(id, a.generation, p).await }
        })
        .map_err(control)?;
        // The end of the job, or a restart round (a peer failed after this rank had finished).
        let ended = rt.block_on(async {
            // Patience with a coordinator that restarts, as every call has (`patiently`).
            let mut unreachable: Option<std::time::Instant> = None;
            loop {
                if unreachable.is_some_and(|t| t.elapsed() > WAIT_PATIENCE) {
                    return Err(EvalError::Control(format!(
                        "the coordinator at {url} stopped answering before the job ended"
                    )));
                }
                let mut c = client.clone();
                let mut watch = match c.watch().await {
                    Ok(w) => w,
                    Err(e) if e.is_transient() => {
                        unreachable.get_or_insert_with(std::time::Instant::now);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => return Err(control(e)),
                };
                unreachable = None;
                while let Some(s) = watch.next().await {
                    match s {
                        Ok(s) if s.phase.is_final() => return Ok(Some(s)),
                        // A restart round (its generation is counted when the round breaks).
                        Ok(s) if s.generation != a.generation => return Ok(None),
                        Ok(_) => {}
                        Err(e) if e.is_transient() => break,
                        Err(e) => return Err(control(e)),
                    }
                }
                unreachable.get_or_insert_with(std::time::Instant::now);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        drop(heartbeats);
        let Some(status) = ended? else {
            continue;
        };
        if status.phase != JobPhase::Completed {
            return Err(EvalError::Control(format!(
                "the evaluation job at {url} {}: {}",
                status.phase,
                status.failure.unwrap_or_default()
            )));
        }
        if a.rank != 0 {
            return Ok(None);
        }
        out.download_parts()?;
        let report = merge(
            out.dir(),
            a.plan.samples as usize,
            a.world_size as usize,
            model_label,
            opts,
        )?;
        out.upload(&REPORT)?;
        return Ok(Some(report));
    }
}
