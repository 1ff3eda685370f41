//! M3D-Bench across pods (`m3d k8s render-eval`): one coordinator pod (`m3d eval bench ... --serve`) and N rank
//! pods (`m3d eval bench ... --coordinator`), all running the same `m3d eval bench` arguments, writing one
//! object-store folder (`-o s3://...`). As a JobSet (the default), which succeeds when every rank has; or, for
//! clusters without the JobSet controller, two Jobs and a Service: the coordinator's Job behind
//! `<name>-coordinator`, and an Indexed Job of ranks, which completes when every rank has. The model folder (and
//! any local input) comes from read-only PersistentVolumeClaims or a store (`--model s3://...`).

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, ContainerPort, GRPCAction, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kcr_jobset_x_k8s_io::v1alpha2::jobsets as js;

use crate::objects::{convert, Object};
use crate::pod::{self, labels, meta};
use crate::{check_name, coordinator_host, Flavor, K8sError, COORDINATOR_PORT};

/// Everything `m3d k8s render-eval` decides.
#[derive(Debug, Clone)]
pub struct EvalJob {
    pub name: String,
    pub namespace: String,
    pub image: String,
    /// Rank pods (`--workers N` of every pod).
    pub ranks: u32,
    /// GPUs per rank pod (0: CPU).
    pub gpus_per_rank: u32,
    /// The `m3d eval bench` arguments every pod shares (`--model /models/lamed --data s3://.. -o s3://..`),
    /// without the ones set per pod (`--workers`, `--serve`, `--coordinator`, `--worker-id`).
    pub args: Vec<String>,
    pub s3_secret: Option<String>,
    /// The job token: an existing Secret (key `token`), or `None` to render one with `token`.
    pub token_secret: Option<String>,
    pub token: String,
    /// PersistentVolumeClaims mounted read-only (claim, mount path): the model folder, local inputs.
    pub claims: Vec<(String, String)>,
    pub cpu: Option<Quantity>,
    pub memory: Option<Quantity>,
    pub priority_class: Option<String>,
    pub queue: Option<String>,
    /// Restart rounds the coordinator forms over surviving ranks (`--restarts`) before the job fails.
    pub restarts: u32,
    pub flavor: Flavor,
}

fn secret_name(job: &EvalJob) -> String {
    job.token_secret
        .clone()
        .unwrap_or_else(|| format!("{}-token", job.name))
}

/// The output folder of `args` (`-o` / `--out`), which must be a store every pod reaches.
fn output(args: &[String]) -> Option<&str> {
    args.iter().enumerate().find_map(|(i, a)| match a.as_str() {
        "-o" | "--out" => args.get(i + 1).map(String::as_str),
        a => a.strip_prefix("--out=").or_else(|| a.strip_prefix("-o=")),
    })
}

fn check_args(job: &EvalJob) -> Result<(), K8sError> {
    for flag in [
        "--workers",
        "--serve",
        "--coordinator",
        "--worker-id",
        "--rank",
    ] {
        if job
            .args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        {
            return Err(K8sError::Option {
                flag: "m3d eval bench arguments",
                why: format!("{flag} is set per pod; leave it out"),
            });
        }
    }
    match output(&job.args) {
        Some(o) if o.contains("://") && !o.starts_with("file://") => Ok(()),
        Some(o) => Err(K8sError::Option {
            flag: "-o",
            why: format!(
                "`{o}`: the ranks run on different pods and must share one object store folder (s3://...)"
            ),
        }),
        None => Err(K8sError::Option {
            flag: "-o",
            why: "the arguments name no output folder (-o s3://...)".into(),
        }),
    }
}

fn eval_pod(job: &EvalJob, role: &str, args: Vec<String>, gpus: u32) -> PodSpec {
    let (mut volumes, mut mounts) = pod::volumes(None, None);
    pod::claim_volumes(&job.claims, &mut volumes, &mut mounts);
    let mut env = pod::common_env();
    env.push(pod::env_token(&secret_name(job)));
    let serving = role == "coordinator";
    let container = Container {
        name: role.to_string(),
        image: Some(job.image.clone()),
        command: Some(vec!["m3d".to_string()]),
        args: Some(args),
        env: Some(env),
        env_from: pod::env_from_secret(job.s3_secret.as_deref()),
        ports: serving.then(|| {
            vec![ContainerPort {
                name: Some("grpc".to_string()),
                container_port: i32::from(COORDINATOR_PORT),
                ..Default::default()
            }]
        }),
        readiness_probe: serving.then(|| Probe {
            grpc: Some(GRPCAction {
                port: i32::from(COORDINATOR_PORT),
                service: None,
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        // The coordinator is the `m3d` binary, which maps libtorch at start (~0.5 GiB resident, unlike the
        // torch-free `m3d-coordinator` of training): 512Mi would leave it no headroom.
        resources: Some(if serving {
            pod::resources(
                Some(&Quantity("500m".into())),
                Some(&Quantity("2Gi".into())),
                0,
            )
        } else {
            pod::resources(job.cpu.as_ref(), job.memory.as_ref(), gpus)
        }),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    pod::pod_spec(container, volumes, None, job.priority_class.as_ref())
}

/// Renders the evaluation's objects in apply order: the token Secret (unless one was named), the JobSet.
pub fn render_eval(job: &EvalJob) -> Result<Vec<Object>, K8sError> {
    check_name("job name", &job.name, 40)?;
    check_name("namespace", &job.namespace, 63)?;
    if job.ranks == 0 {
        return Err(K8sError::Option {
            flag: "--ranks",
            why: "at least one rank".into(),
        });
    }
    check_args(job)?;
    let mut common = vec!["eval".to_string(), "bench".to_string()];
    common.extend(job.args.iter().cloned());
    common.extend(["--workers".to_string(), job.ranks.to_string()]);
    let mut serve = common.clone();
    serve.extend([
        "--serve".to_string(),
        format!("0.0.0.0:{COORDINATOR_PORT}"),
        // Pods may take as long to be scheduled and pull the image.
        "--rendezvous-timeout".to_string(),
        "15m".to_string(),
        "--restarts".to_string(),
        job.restarts.to_string(),
    ]);
    let mut rank = common;
    rank.extend([
        "--coordinator".to_string(),
        format!(
            "http://{}:{COORDINATOR_PORT}",
            coordinator_host(&job.name, job.flavor)
        ),
        "--worker-id".to_string(),
        "rank-$(JOB_COMPLETION_INDEX)".to_string(),
    ]);
    let coordinator = JobSpec {
        completion_mode: Some("Indexed".to_string()),
        backoff_limit: Some(0),
        completions: Some(1),
        parallelism: Some(1),
        pod_failure_policy: Some(pod::on_disruption("FailJob")),
        template: pod::template(
            &job.name,
            "coordinator",
            eval_pod(job, "coordinator", serve, 0),
        ),
        ..Default::default()
    };
    let n = job.ranks as i32;
    let ranks = JobSpec {
        completion_mode: Some("Indexed".to_string()),
        completions: Some(n),
        parallelism: Some(n),
        backoff_limit: Some(0),
        pod_failure_policy: Some(pod::on_disruption("FailJob")),
        template: pod::template(
            &job.name,
            "ranks",
            eval_pod(job, "rank", rank, job.gpus_per_rank),
        ),
        ..Default::default()
    };
    let mut objects = Vec::new();
    if job.token_secret.is_none() {
        objects.push(Object::of(&pod::token_secret(
            &job.name,
            &job.namespace,
            &secret_name(job),
            &job.token,
        ))?);
    }
    match job.flavor {
        Flavor::JobSet => objects.push(Object::of(&jobset(job, coordinator, ranks)?)?),
        Flavor::IndexedJob => objects.extend(indexed_jobs(job, coordinator, ranks)?),
    }
    Ok(objects)
}

/// Two Jobs and the coordinator's Service, for clusters without the JobSet controller.
fn indexed_jobs(
    job: &EvalJob,
    mut coordinator: JobSpec,
    mut ranks: JobSpec,
) -> Result<Vec<Object>, K8sError> {
    // A coordinator pod lost is replaced, and continues from its state in the output folder (a new round
    // over the ranks that register again). A rank pod lost to a disruption is replaced without counting
    // against the backoff limit; a rank that fails counts, and the coordinator's restart budget decides.
    coordinator.backoff_limit = Some(3);
    coordinator.pod_failure_policy = Some(pod::on_disruption("Ignore"));
    ranks.backoff_limit = Some(job.restarts as i32);
    ranks.pod_failure_policy = Some(pod::on_disruption("Ignore"));
    // Kueue admits the ranks as one workload; the small coordinator is not queued (as in training).
    let ranks_meta = pod::queued(
        meta(
            &format!("{}-ranks", job.name),
            &job.namespace,
            labels(&job.name, Some("ranks")),
        ),
        job.queue.as_ref(),
    );
    ranks.suspend = job.queue.as_ref().map(|_| true);
    let coordinator = Job {
        metadata: meta(
            &format!("{}-coordinator", job.name),
            &job.namespace,
            labels(&job.name, Some("coordinator")),
        ),
        spec: Some(coordinator),
        ..Default::default()
    };
    let ranks = Job {
        metadata: ranks_meta,
        spec: Some(ranks),
        ..Default::default()
    };
    Ok(vec![
        Object::of(&pod::coordinator_service(&job.name, &job.namespace))?,
        Object::of(&coordinator)?,
        Object::of(&ranks)?,
    ])
}

/// One JobSet: the coordinator and the ranks as its replicated Jobs.
fn jobset(job: &EvalJob, coordinator: JobSpec, ranks: JobSpec) -> Result<js::JobSet, K8sError> {
    let coordinator: js::JobSetReplicatedJobsTemplateSpec =
        convert("coordinator Job spec", &coordinator)?;
    let ranks: js::JobSetReplicatedJobsTemplateSpec = convert("ranks Job spec", &ranks)?;
    let rjob = |name: &str, spec| js::JobSetReplicatedJobs {
        name: name.to_string(),
        replicas: Some(1),
        template: js::JobSetReplicatedJobsTemplate {
            metadata: Some(js::JobSetReplicatedJobsTemplateMetadata {
                labels: Some(labels(&job.name, Some(name))),
                ..Default::default()
            }),
            spec: Some(spec),
        },
        ..Default::default()
    };
    let md = pod::queued(
        meta(&job.name, &job.namespace, labels(&job.name, None)),
        job.queue.as_ref(),
    );
    let spec = js::JobSetSpec {
        suspend: job.queue.as_ref().map(|_| true),
        network: Some(js::JobSetNetwork {
            enable_dns_hostnames: Some(true),
            publish_not_ready_addresses: Some(true),
            subdomain: Some(job.name.clone()),
        }),
        // A failed rank is the coordinator's to handle (a restart round over the survivors, `--restarts`); a
        // pod that fails for good fails the set (results already in the store stay there).
        failure_policy: Some(js::JobSetFailurePolicy {
            max_restarts: Some(0),
            ..Default::default()
        }),
        success_policy: Some(js::JobSetSuccessPolicy {
            operator: js::JobSetSuccessPolicyOperator::All,
            target_replicated_jobs: Some(vec!["ranks".to_string()]),
        }),
        replicated_jobs: Some(vec![rjob("coordinator", coordinator), rjob("ranks", ranks)]),
        ..Default::default()
    };
    let mut set = js::JobSet::new(&job.name, spec);
    set.metadata = md;
    Ok(set)
}
