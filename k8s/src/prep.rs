//! A data-prep conversion across pods: one pod per part (`m3d-data-prep <dataset> ... --part-index
//! $JOB_COMPLETION_INDEX --parts N`), then one pod that runs `m3d-data-prep finalize`. As a JobSet the finalize
//! job starts when every part is complete; as plain Jobs the finalize pod waits for the parts' records itself.
//! The pods run `m3d-data-prep` (the `m3d data-prep` subcommands without libtorch), not `m3d`: each pod is spared
//! libtorch's start-up and its ~0.5 GiB resident, so the image must carry that binary (k8s/image.sh, Containerfile).

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kcr_jobset_x_k8s_io::v1alpha2::jobsets as js;

use crate::objects::{convert, Object};
use crate::pod::{self, labels, meta};
use crate::{check_name, Flavor, K8sError};

/// Attempts of one part before the conversion fails: a part resumes from its finished shards.
const PART_ATTEMPTS: i32 = 3;

/// Everything `m3d k8s render-prep` decides.
#[derive(Debug, Clone)]
pub struct PrepJob {
    pub name: String,
    pub namespace: String,
    pub image: String,
    /// Pods converting in parallel (`--parts N`).
    pub parts: u32,
    /// `m3d-data-prep` arguments of one conversion without the part (`cap --src /data/M3D_Cap --out s3://..`).
    pub args: Vec<String>,
    /// The dataset URL the parts write (`--out`), which finalize merges.
    pub out: String,
    pub s3_secret: Option<String>,
    /// PersistentVolumeClaims mounted read-only (claim, mount path): where the published raw data is.
    pub claims: Vec<(String, String)>,
    pub cpu: Option<Quantity>,
    pub memory: Option<Quantity>,
    pub priority_class: Option<String>,
    pub queue: Option<String>,
    pub flavor: Flavor,
}

fn pod_spec(job: &PrepJob, name: &str, args: Vec<String>) -> PodSpec {
    let (mut volumes, mut mounts) = pod::volumes(None, None);
    pod::claim_volumes(&job.claims, &mut volumes, &mut mounts);
    let container = Container {
        name: name.to_string(),
        image: Some(job.image.clone()),
        command: Some(vec!["m3d-data-prep".to_string()]),
        args: Some(args),
        env: Some(pod::common_env()),
        env_from: pod::env_from_secret(job.s3_secret.as_deref()),
        resources: Some(pod::resources(job.cpu.as_ref(), job.memory.as_ref(), 0)),
        security_context: Some(pod::container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    pod::pod_spec(container, volumes, None, job.priority_class.as_ref())
}

fn parts_spec(job: &PrepJob) -> JobSpec {
    let mut args = job.args.clone();
    args.extend([
        "--part-index".to_string(),
        "$(JOB_COMPLETION_INDEX)".to_string(),
        "--parts".to_string(),
        job.parts.to_string(),
    ]);
    let n = job.parts as i32;
    JobSpec {
        completion_mode: Some("Indexed".to_string()),
        completions: Some(n),
        parallelism: Some(n),
        // Each part retries on its own (a disruption does not count); one part out of attempts fails the Job.
        backoff_limit_per_index: Some(PART_ATTEMPTS - 1),
        pod_failure_policy: Some(pod::on_disruption("Ignore")),
        template: pod::template(&job.name, "parts", pod_spec(job, "part", args)),
        ..Default::default()
    }
}

fn finalize_spec(job: &PrepJob, wait: bool) -> JobSpec {
    let mut args = vec!["finalize".to_string(), job.out.clone()];
    if wait {
        args.extend(["--wait".to_string(), "24h".to_string()]);
    }
    JobSpec {
        completions: Some(1),
        parallelism: Some(1),
        backoff_limit: Some(PART_ATTEMPTS - 1),
        pod_failure_policy: Some(pod::on_disruption("Ignore")),
        template: pod::template(&job.name, "finalize", pod_spec(job, "finalize", args)),
        ..Default::default()
    }
}

/// Renders the conversion's objects in apply order.
pub fn render_prep(job: &PrepJob) -> Result<Vec<Object>, K8sError> {
    check_name("job name", &job.name, 40)?;
    check_name("namespace", &job.namespace, 63)?;
    if job.parts == 0 {
        return Err(K8sError::Option {
            flag: "--parts",
            why: "at least one part".into(),
        });
    }
    if job
        .args
        .iter()
        .any(|a| a == "--part" || a.starts_with("--part="))
    {
        return Err(K8sError::Option {
            flag: "data-prep arguments",
            why: "--part is set per pod from its completion index; leave it out".into(),
        });
    }
    if !job.out.contains("://") || job.out.starts_with("file://") {
        return Err(K8sError::Option {
            flag: "--out",
            why: format!(
                "`{}`: the parts run on different pods and must write one object store URL (s3://...)",
                job.out
            ),
        });
    }
    let md = pod::queued(
        meta(&job.name, &job.namespace, labels(&job.name, None)),
        job.queue.as_ref(),
    );
    match job.flavor {
        Flavor::JobSet => {
            let parts: js::JobSetReplicatedJobsTemplateSpec =
                convert("parts Job spec", &parts_spec(job))?;
            let finalize: js::JobSetReplicatedJobsTemplateSpec =
                convert("finalize Job spec", &finalize_spec(job, false))?;
            let rjob = |name: &str, spec, depends: Option<&str>| js::JobSetReplicatedJobs {
                name: name.to_string(),
                replicas: Some(1),
                depends_on: depends.map(|d| {
                    vec![js::JobSetReplicatedJobsDependsOn {
                        name: d.to_string(),
                        status: js::JobSetReplicatedJobsDependsOnStatus::Complete,
                    }]
                }),
                template: js::JobSetReplicatedJobsTemplate {
                    metadata: Some(js::JobSetReplicatedJobsTemplateMetadata {
                        labels: Some(labels(&job.name, Some(name))),
                        ..Default::default()
                    }),
                    spec: Some(spec),
                },
                ..Default::default()
            };
            let spec = js::JobSetSpec {
                suspend: job.queue.as_ref().map(|_| true),
                failure_policy: Some(js::JobSetFailurePolicy {
                    max_restarts: Some(0),
                    ..Default::default()
                }),
                replicated_jobs: Some(vec![
                    rjob("parts", parts, None),
                    rjob("finalize", finalize, Some("parts")),
                ]),
                ..Default::default()
            };
            let mut set = js::JobSet::new(&job.name, spec);
            set.metadata = md;
            Ok(vec![Object::of(&set)?])
        }
        Flavor::IndexedJob => {
            let mut parts = parts_spec(job);
            let mut finalize = finalize_spec(job, true);
            if job.queue.is_some() {
                parts.suspend = Some(true);
                finalize.suspend = Some(true);
            }
            let mut parts_md = md.clone();
            parts_md.name = Some(format!("{}-parts", job.name));
            let mut fin_md = md;
            fin_md.name = Some(format!("{}-finalize", job.name));
            Ok(vec![
                Object::of(&Job {
                    metadata: parts_md,
                    spec: Some(parts),
                    ..Default::default()
                })?,
                Object::of(&Job {
                    metadata: fin_md,
                    spec: Some(finalize),
                    ..Default::default()
                })?,
            ])
        }
    }
}
