//! The pieces every m3d pod is made of: the recipe mount, shared memory, a writable /tmp, the non-root security
//! context, environment from the downward API and Secrets, and the failure rule that tells a preemption from a
//! crash.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret, SecretEnvSource,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{COORDINATOR_PORT, RECIPE_DIR, RUN_AS, TOKEN_KEY};

/// The label every object of one job carries (selectors, `kubectl delete -l`).
pub(crate) const JOB_LABEL: &str = "m3d.dev/job";
/// The label naming an object's role in the job (`coordinator`, `workers`, `parts`, `finalize`).
pub(crate) const ROLE_LABEL: &str = "m3d.dev/role";

pub(crate) fn labels(job: &str, role: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "m3d".to_string()),
        (JOB_LABEL.to_string(), job.to_string()),
    ]);
    if let Some(r) = role {
        l.insert(ROLE_LABEL.to_string(), r.to_string());
    }
    l
}

pub(crate) fn meta(name: &str, namespace: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        ..Default::default()
    }
}

pub(crate) fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

/// An environment variable from the downward API (`status.podIP`, `metadata.name`, ...).
pub(crate) fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `M3D_TOKEN` from the job's token Secret: the processes read it from the environment, never from a flag
/// (which `ps` and pod specs show).
pub(crate) fn env_token(secret: &str) -> EnvVar {
    EnvVar {
        name: "M3D_TOKEN".to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: TOKEN_KEY.to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every key of the object-store Secret as an environment variable (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION`, ...: what `m3d-store` reads).
pub(crate) fn env_from_secret(secret: Option<&str>) -> Option<Vec<EnvFromSource>> {
    secret.map(|s| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: s.to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        }]
    })
}

/// The variables every m3d process in a pod gets: JSON logs, and scratch space on the pod's /tmp volume.
pub(crate) fn common_env() -> Vec<EnvVar> {
    vec![env("M3D_LOG_FORMAT", "json"), env("TMPDIR", "/tmp")]
}

pub(crate) const RECIPE_VOLUME: &str = "recipe";
const SHM_VOLUME: &str = "dshm";
const TMP_VOLUME: &str = "tmp";

/// The recipe ConfigMap (read-only at [`RECIPE_DIR`]), `/dev/shm` as memory of at most `shm` (NCCL and
/// pinned host buffers need more than a container runtime's 64 MiB default), and a writable `/tmp` (the
/// root filesystem is read-only).
pub(crate) fn volumes(
    recipe_config_map: Option<&str>,
    shm: Option<&Quantity>,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut vols = Vec::new();
    let mut mounts = Vec::new();
    if let Some(cm) = recipe_config_map {
        vols.push(Volume {
            name: RECIPE_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: RECIPE_VOLUME.to_string(),
            mount_path: RECIPE_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if let Some(size) = shm {
        vols.push(Volume {
            name: SHM_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_string()),
                size_limit: Some(size.clone()),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: SHM_VOLUME.to_string(),
            mount_path: "/dev/shm".to_string(),
            ..Default::default()
        });
    }
    vols.push(Volume {
        name: TMP_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: TMP_VOLUME.to_string(),
        mount_path: "/tmp".to_string(),
        ..Default::default()
    });
    (vols, mounts)
}

/// Non-root, no privilege escalation, no capabilities, the runtime's default seccomp profile, a read-only
/// root filesystem: what the `restricted` Pod Security Standard asks.
pub(crate) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        ..Default::default()
    }
}

/// Requests of CPU and memory (and the same memory as limit: a training pod that outgrows its request should
/// fail where it is visible, not be OOM-killed under node pressure later), GPUs as limits.
pub(crate) fn resources(
    cpu: Option<&Quantity>,
    memory: Option<&Quantity>,
    gpus: u32,
) -> ResourceRequirements {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(c) = cpu {
        requests.insert("cpu".to_string(), c.clone());
    }
    if let Some(m) = memory {
        requests.insert("memory".to_string(), m.clone());
        limits.insert("memory".to_string(), m.clone());
    }
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(gpus.to_string()));
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    }
}

/// What a Job does with a pod the cluster took away (preemption, eviction, node drain or loss: the
/// `DisruptionTarget` condition). In a JobSet, `FailJob`: the Job fails at once with reason `PodFailurePolicy`,
/// which the JobSet's failure policy restarts without counting (any other failed pod fails the Job through
/// `backoffLimit: 0`, reason `BackoffLimitExceeded`, which counts). In a plain Job, `Ignore`: the pod is
/// replaced without counting against `backoffLimit`.
pub(crate) fn on_disruption(action: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![PodFailurePolicyRule {
            action: action.to_string(),
            on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                type_: "DisruptionTarget".to_string(),
                status: "True".to_string(),
            }]),
            ..Default::default()
        }],
    }
}

/// PersistentVolumeClaims `(claim, mount path)` mounted read-only (the published raw data, a model folder),
/// added to a pod's volumes and its container's mounts.
pub(crate) fn claim_volumes(
    claims: &[(String, String)],
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) {
    for (i, (claim, path)) in claims.iter().enumerate() {
        let vol = format!("data-{i}");
        volumes.push(Volume {
            name: vol.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: vol,
            mount_path: path.clone(),
            read_only: Some(true),
            ..Default::default()
        });
    }
}

/// The Secret holding a job's coordinator token (key [`TOKEN_KEY`]).
pub(crate) fn token_secret(job: &str, namespace: &str, secret: &str, token: &str) -> Secret {
    Secret {
        metadata: meta(secret, namespace, labels(job, None)),
        type_: Some("Opaque".to_string()),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token.to_string())])),
        ..Default::default()
    }
}

/// `md` labelled for Kueue's `LocalQueue` `queue`, when there is one.
pub(crate) fn queued(mut md: ObjectMeta, queue: Option<&String>) -> ObjectMeta {
    if let Some(q) = queue {
        md.labels
            .get_or_insert_with(BTreeMap::new)
            .insert("kueue.x-k8s.io/queue-name".to_string(), q.clone());
    }
    md
}

/// A Job's pod template: `spec` with the job's labels and `role`.
pub(crate) fn template(job: &str, role: &str, spec: PodSpec) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(job, Some(role))),
            ..Default::default()
        }),
        spec: Some(spec),
    }
}

/// A pod of one m3d container: never restarted in place (its Job decides), the non-root pod security context.
pub(crate) fn pod_spec(
    container: Container,
    volumes: Vec<Volume>,
    grace_period_s: Option<i64>,
    priority_class: Option<&String>,
) -> PodSpec {
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        restart_policy: Some("Never".to_string()),
        termination_grace_period_seconds: grace_period_s,
        security_context: Some(pod_security()),
        priority_class_name: priority_class.cloned(),
        ..Default::default()
    }
}

/// The Service `<job>-coordinator` in front of the coordinator pod's `grpc` port: how pods find the coordinator
/// when no JobSet gives it a stable DNS name (the indexed-job flavors).
pub(crate) fn coordinator_service(job: &str, namespace: &str) -> Service {
    let role = labels(job, Some("coordinator"));
    Service {
        metadata: meta(&format!("{job}-coordinator"), namespace, role.clone()),
        spec: Some(ServiceSpec {
            selector: Some(role),
            ports: Some(vec![ServicePort {
                name: Some("grpc".to_string()),
                port: i32::from(COORDINATOR_PORT),
                target_port: Some(IntOrString::String("grpc".to_string())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
