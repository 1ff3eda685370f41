//! A training job's objects: the recipe ConfigMap, the token Secret, and either a JobSet (coordinator +
//! workers, the default) or, for clusters without the JobSet controller, an Indexed Job of workers with a
//! headless Service and the coordinator as a Deployment behind a Service.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, GRPCAction, PodSpec, PodTemplateSpec, Probe, Secret,
    Service, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kcr_jobset_x_k8s_io::v1alpha2::jobsets as js;
use m3d_recipes::{DeviceKind, Recipe};
use sha2::{Digest, Sha256};

use crate::objects::{convert, Object};
use crate::pod::{self, labels, meta};
use crate::{check_name, K8sError, COORDINATOR_PORT, RECIPE_DIR, RECIPE_FILE};

/// How the job is laid out on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// One JobSet (`jobset.x-k8s.io/v1alpha2`): gang restarts, failure rules, stable pod DNS names.
    JobSet,
    /// An Indexed Job + headless Service for the workers, a Deployment + Service for the coordinator.
    IndexedJob,
}

/// Everything `m3d k8s render` decides; [`render_train`] turns it into objects.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The effective recipe (overrides applied): it goes into the ConfigMap as it is.
    pub recipe: Recipe,
    /// Object names derive from it (`<name>-coordinator-0-0.<name>` is the coordinator's DNS name).
    pub name: String,
    pub namespace: String,
    pub image: String,
    /// Worker pods (the world size is `workers × max(gpus_per_worker, 1)`).
    pub workers: u32,
    /// GPUs per worker pod (`nvidia.com/gpu` limit); 0 on CPU.
    pub gpus_per_worker: u32,
    pub worker_cpu: Option<Quantity>,
    pub worker_memory: Option<Quantity>,
    /// Size limit of the worker's memory-backed `/dev/shm`.
    pub shm: Quantity,
    /// Kueue's `LocalQueue`: the JobSet is labelled for it and created suspended, for Kueue to admit as a gang.
    pub queue: Option<String>,
    pub priority_class: Option<String>,
    /// A Secret whose keys become the environment of every pod (the object store's `AWS_*` settings).
    pub s3_secret: Option<String>,
    /// The job token: an existing Secret's name (key `token`), or `None` to render a new Secret with a
    /// fresh token.
    pub token_secret: Option<String>,
    /// The generated token when `token_secret` is `None`.
    pub token: String,
    /// Where the coordinator keeps the job state (a restarted coordinator pod continues from it).
    pub state_url: String,
    pub flavor: Flavor,
    /// Seconds between SIGTERM and SIGKILL: see [`grace_period_s`].
    pub grace_period_s: i64,
    /// Restarts of the whole job for failures other than disruptions (`JobSet.spec.failurePolicy.maxRestarts`;
    /// the Indexed Job's `backoffLimit`).
    pub max_restarts: u32,
    /// JobSet's exclusive placement (`alpha.jobset.sigs.k8s.io/exclusive-topology: KEY`): the workers Job's
    /// pods all in one domain of this node label (a node pool, a rack), which no other Job shares. It is per
    /// child Job, and all workers are one Job: `kubernetes.io/hostname` would put every worker on one node.
    pub exclusive_topology: Option<String>,
}

/// The grace period a worker needs to stop cleanly: finish the step in flight (`step_allowance_s`), then write
/// and commit a checkpoint of `checkpoint_bytes` at an assumed 50 MB/s to the object store (a conservative
/// single-stream rate from a pod; in-cluster S3 gateways are usually several times faster), plus 30 s for the
/// commit and exit; rounded up to a whole 30 s. Full-size M3D-CLIP (2.4 GB with AdamW state) with a 60 s
/// step allowance: 60 + 48 + 30 -> 150 s.
pub fn grace_period_s(checkpoint_bytes: u64, step_allowance_s: u64) -> i64 {
    const BYTES_PER_S: u64 = 50_000_000;
    let write = checkpoint_bytes.div_ceil(BYTES_PER_S);
    let total = step_allowance_s + write + 30;
    (total.div_ceil(30) * 30) as i64
}

fn secret_name(job: &TrainJob) -> String {
    job.token_secret
        .clone()
        .unwrap_or_else(|| format!("{}-token", job.name))
}

/// The coordinator's address as the workers dial it: the JobSet's stable pod DNS name
/// (`<jobset>-<replicated job>-<job index>-<pod index>.<subdomain>`), or the coordinator Service.
pub fn coordinator_host(name: &str, flavor: Flavor) -> String {
    match flavor {
        Flavor::JobSet => format!("{name}-coordinator-0-0.{name}"),
        Flavor::IndexedJob => format!("{name}-coordinator"),
    }
}

/// Refuses recipe values that only work on one machine: a pod's file system is gone when it is.
fn check_recipe(recipe: &Recipe) -> Result<(), K8sError> {
    let local = |key: String, value: &str| -> Result<(), K8sError> {
        if value.contains("://") && !value.starts_with("file://") {
            return Ok(());
        }
        Err(K8sError::Recipe {
            key,
            value: value.to_string(),
            why: "a pod's files are lost when it stops; use an object store URL (s3://...), e.g. \
                  --set KEY=s3://bucket/path"
                .into(),
        })
    };
    for (i, t) in recipe.data.tasks.iter().enumerate() {
        for (j, s) in t.shards.iter().enumerate() {
            local(format!("data.tasks[{i}].shards[{j}]"), s)?;
        }
        for (j, s) in t.volumes.iter().enumerate() {
            local(format!("data.tasks[{i}].volumes[{j}]"), s)?;
        }
    }
    local("output.run".into(), &recipe.run_url())?;
    local("checkpoint.url".into(), &recipe.checkpoint_url())?;
    if recipe.checkpoint.every == 0 {
        return Err(K8sError::Recipe {
            key: "checkpoint.every".into(),
            value: "0".into(),
            why: "a preempted or restarted job resumes from its last checkpoint; without checkpoints it \
                  starts over"
                .into(),
        });
    }
    Ok(())
}

fn recipe_config_map(job: &TrainJob) -> ConfigMap {
    let yaml = job.recipe.to_yaml();
    let hash = hex::encode(Sha256::digest(yaml.as_bytes()));
    ConfigMap {
        metadata: meta(
            &format!("{}-recipe-{}", job.name, &hash[..10]),
            &job.namespace,
            labels(&job.name, None),
        ),
        data: Some(BTreeMap::from([(RECIPE_FILE.to_string(), yaml)])),
        ..Default::default()
    }
}

fn token_secret(job: &TrainJob) -> Secret {
    pod::token_secret(&job.name, &job.namespace, &secret_name(job), &job.token)
}

fn recipe_path() -> String {
    format!("{RECIPE_DIR}/{RECIPE_FILE}")
}

fn coordinator_pod(job: &TrainJob, config_map: &str) -> PodSpec {
    let (volumes, mounts) = pod::volumes(Some(config_map), None);
    let mut env = pod::common_env();
    env.push(pod::env_token(&secret_name(job)));
    let container = Container {
        name: "coordinator".to_string(),
        image: Some(job.image.clone()),
        command: Some(vec!["m3d-coordinator".to_string()]),
        args: Some(vec![
            "--listen".into(),
            format!("0.0.0.0:{COORDINATOR_PORT}"),
            "--state".into(),
            job.state_url.clone(),
            "--recipe".into(),
            recipe_path(),
            "--exit-on-finish".into(),
            // On SIGTERM, serve the workers' last checkpoint commit before leaving.
            "--drain-timeout".into(),
            format!("{}s", job.grace_period_s),
            // Every worker is in every round (a missing one fails its pod and the whole set restarts), so a
            // round waits for all of them, as long as pods may take to be scheduled and pull the image.
            "--rendezvous-timeout".into(),
            "15m".into(),
            // The restart budget is the cluster's (the JobSet's `maxRestarts`, the Indexed Job's
            // `backoffLimit`), which knows a preemption from a crash; the coordinator forms whatever rounds the
            // pods it is given need (a JobSet restart replaces every worker at once: one new round).
            "--restarts".into(),
            "10000".into(),
        ]),
        env: Some(env),
        env_from: pod::env_from_secret(job.s3_secret.as_deref()),
        ports: Some(vec![ContainerPort {
            name: Some("grpc".to_string()),
            container_port: i32::from(COORDINATOR_PORT),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            grpc: Some(GRPCAction {
                port: i32::from(COORDINATOR_PORT),
                service: None,
            }),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(pod::resources(
            Some(&Quantity("500m".into())),
            Some(&Quantity("512Mi".into())),
            0,
        )),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    // The coordinator outlives the workers' last checkpoint commit: it drains for as long as they may take.
    pod::pod_spec(
        container,
        volumes,
        Some(job.grace_period_s + 30),
        job.priority_class.as_ref(),
    )
}

fn worker_pod(job: &TrainJob, config_map: &str) -> PodSpec {
    let (volumes, mounts) = pod::volumes(Some(config_map), Some(&job.shm));
    let mut env = pod::common_env();
    env.extend([
        pod::env_field("POD_IP", "status.podIP"),
        pod::env_field("POD_NAME", "metadata.name"),
        pod::env_token(&secret_name(job)),
    ]);
    let container = Container {
        name: "worker".to_string(),
        image: Some(job.image.clone()),
        command: Some(vec!["m3d".to_string()]),
        args: Some(vec![
            "worker".into(),
            "--coordinator".into(),
            format!(
                "http://{}:{COORDINATOR_PORT}",
                coordinator_host(&job.name, job.flavor)
            ),
            "--recipe".into(),
            recipe_path(),
            // The ring listens on the pod's own address; peers dial it directly.
            "--bind".into(),
            "$(POD_IP)".into(),
            // Stable across restarts (the completion index), and the rank hint: ranks are ordered by host,
            // then id, and each pod is its own host so its processes see their GPUs from cuda:0.
            "--worker-id".into(),
            "worker-$(JOB_COMPLETION_INDEX)".into(),
            "--host".into(),
            "$(POD_NAME)".into(),
            // One process per GPU of the pod.
            "--procs".into(),
            job.gpus_per_worker.max(1).to_string(),
        ]),
        env: Some(env),
        env_from: pod::env_from_secret(job.s3_secret.as_deref()),
        resources: Some(pod::resources(
            job.worker_cpu.as_ref(),
            job.worker_memory.as_ref(),
            job.gpus_per_worker,
        )),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    pod::pod_spec(
        container,
        volumes,
        Some(job.grace_period_s),
        job.priority_class.as_ref(),
    )
}

fn indexed_job_spec(pods: u32, template: PodTemplateSpec, backoff_limit: i32) -> JobSpec {
    let n = pods as i32;
    JobSpec {
        completion_mode: Some("Indexed".to_string()),
        completions: Some(n),
        parallelism: Some(n),
        backoff_limit: Some(backoff_limit),
        template,
        ..Default::default()
    }
}

/// Renders the job's objects in apply order.
pub fn render_train(job: &TrainJob) -> Result<Vec<Object>, K8sError> {
    // `<name>-coordinator-0-0` must stay a DNS label (63) with the Job controller's 5-character pod suffix.
    check_name("job name", &job.name, 40)?;
    check_name("namespace", &job.namespace, 63)?;
    if let Some(s) = &job.token_secret {
        check_name("token Secret name", s, 253)?;
    }
    if job.workers == 0 {
        return Err(K8sError::Option {
            flag: "--workers",
            why: "at least one worker".into(),
        });
    }
    if job.gpus_per_worker > 0 && job.recipe.workers.device != DeviceKind::Cuda {
        return Err(K8sError::Recipe {
            key: "workers.device".into(),
            value: "cpu".into(),
            why: format!(
                "--gpus-per-worker {} asks for GPUs that a CPU recipe would not use (--set workers.device=cuda)",
                job.gpus_per_worker
            ),
        });
    }
    let world = job.workers as usize * job.gpus_per_worker.max(1) as usize;
    let sizes = job.recipe.world_sizes();
    if !sizes.contains(&world) {
        return Err(K8sError::Recipe {
            key: "workers.min/max".into(),
            value: format!("{}..={}", sizes.start(), sizes.end()),
            why: format!("the recipe does not run with {world} workers"),
        });
    }
    check_recipe(&job.recipe)?;
    let cm = recipe_config_map(job);
    let cm_name = cm.metadata.name.clone().unwrap_or_default();
    let mut objects = Vec::new();
    if job.token_secret.is_none() {
        objects.push(Object::of(&token_secret(job))?);
    }
    objects.push(Object::of(&cm)?);
    match job.flavor {
        Flavor::JobSet => objects.push(Object::of(&jobset(job, &cm_name)?)?),
        Flavor::IndexedJob => objects.extend(indexed_flavor(job, &cm_name)?),
    }
    Ok(objects)
}

fn jobset(job: &TrainJob, cm: &str) -> Result<js::JobSet, K8sError> {
    let coordinator = JobSpec {
        // Indexed, as JobSet's defaulting makes it: its pod's host name is `<name>-coordinator-0-0`.
        completion_mode: Some("Indexed".to_string()),
        backoff_limit: Some(0),
        completions: Some(1),
        parallelism: Some(1),
        pod_failure_policy: Some(pod::on_disruption("FailJob")),
        template: pod::template(&job.name, "coordinator", coordinator_pod(job, cm)),
        ..Default::default()
    };
    let mut workers = indexed_job_spec(
        job.workers,
        pod::template(&job.name, "workers", worker_pod(job, cm)),
        0,
    );
    workers.pod_failure_policy = Some(pod::on_disruption("FailJob"));
    let coordinator: js::JobSetReplicatedJobsTemplateSpec =
        convert("coordinator Job spec", &coordinator)?;
    let workers: js::JobSetReplicatedJobsTemplateSpec = convert("workers Job spec", &workers)?;
    let mut workers_meta = js::JobSetReplicatedJobsTemplateMetadata {
        labels: Some(labels(&job.name, Some("workers"))),
        ..Default::default()
    };
    if let Some(key) = &job.exclusive_topology {
        workers_meta.annotations = Some(BTreeMap::from([(
            "alpha.jobset.sigs.k8s.io/exclusive-topology".to_string(),
            key.clone(),
        )]));
    }
    let md = pod::queued(
        meta(&job.name, &job.namespace, labels(&job.name, None)),
        job.queue.as_ref(),
    );
    let spec = js::JobSetSpec {
        // Kueue admits a suspended JobSet as one gang (it unsuspends it when the whole quota is there).
        suspend: job.queue.as_ref().map(|_| true),
        network: Some(js::JobSetNetwork {
            enable_dns_hostnames: Some(true),
            publish_not_ready_addresses: Some(true),
            subdomain: Some(job.name.clone()),
        }),
        failure_policy: Some(js::JobSetFailurePolicy {
            max_restarts: Some(job.max_restarts as i32),
            restart_strategy: Some(js::JobSetFailurePolicyRestartStrategy::Recreate),
            rules: Some(vec![js::JobSetFailurePolicyRules {
                name: "DisruptionIsFree".to_string(),
                action: js::JobSetFailurePolicyRulesAction::RestartJobSetAndIgnoreMaxRestarts,
                on_job_failure_reasons: Some(vec!["PodFailurePolicy".to_string()]),
                on_job_failure_message_patterns: None,
                target_replicated_jobs: None,
            }]),
        }),
        success_policy: Some(js::JobSetSuccessPolicy {
            operator: js::JobSetSuccessPolicyOperator::All,
            target_replicated_jobs: Some(vec!["workers".to_string()]),
        }),
        replicated_jobs: Some(vec![
            js::JobSetReplicatedJobs {
                name: "coordinator".to_string(),
                replicas: Some(1),
                template: js::JobSetReplicatedJobsTemplate {
                    metadata: Some(js::JobSetReplicatedJobsTemplateMetadata {
                        labels: Some(labels(&job.name, Some("coordinator"))),
                        ..Default::default()
                    }),
                    spec: Some(coordinator),
                },
                ..Default::default()
            },
            js::JobSetReplicatedJobs {
                name: "workers".to_string(),
                replicas: Some(1),
                depends_on: Some(vec![js::JobSetReplicatedJobsDependsOn {
                    name: "coordinator".to_string(),
                    status: js::JobSetReplicatedJobsDependsOnStatus::Ready,
                }]),
                template: js::JobSetReplicatedJobsTemplate {
                    metadata: Some(workers_meta),
                    spec: Some(workers),
                },
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let mut set = js::JobSet::new(&job.name, spec);
    set.metadata = md;
    Ok(set)
}

fn indexed_flavor(job: &TrainJob, cm: &str) -> Result<Vec<Object>, K8sError> {
    let coord_labels = labels(&job.name, Some("coordinator"));
    let workers_labels = labels(&job.name, Some("workers"));
    let coord_svc = pod::coordinator_service(&job.name, &job.namespace);
    let mut coord_pod = coordinator_pod(job, cm);
    // A Deployment's pods restart in place: the coordinator continues from its state in the store.
    coord_pod.restart_policy = Some("Always".to_string());
    let deployment = Deployment {
        metadata: meta(
            &format!("{}-coordinator", job.name),
            &job.namespace,
            coord_labels.clone(),
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(coord_labels.clone()),
                ..Default::default()
            },
            // Never two coordinators of one job state at once.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_string()),
                ..Default::default()
            }),
            template: pod::template(&job.name, "coordinator", coord_pod),
            ..Default::default()
        }),
        ..Default::default()
    };
    let headless = Service {
        metadata: meta(
            &format!("{}-workers", job.name),
            &job.namespace,
            workers_labels.clone(),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            selector: Some(workers_labels),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut pod = worker_pod(job, cm);
    pod.subdomain = Some(format!("{}-workers", job.name));
    let mut spec = indexed_job_spec(
        job.workers,
        pod::template(&job.name, "workers", pod),
        job.max_restarts as i32,
    );
    spec.pod_failure_policy = Some(pod::on_disruption("Ignore"));
    spec.suspend = job.queue.as_ref().map(|_| true);
    let workers = Job {
        metadata: pod::queued(
            meta(
                &format!("{}-workers", job.name),
                &job.namespace,
                labels(&job.name, Some("workers")),
            ),
            job.queue.as_ref(),
        ),
        spec: Some(spec),
        ..Default::default()
    };
    Ok(vec![
        Object::of(&coord_svc)?,
        Object::of(&deployment)?,
        Object::of(&headless)?,
        Object::of(&workers)?,
    ])
}
