//! `m3d k8s render` / `render-prep` as a user runs them: every rendered object is validated against the real
//! schemas (core kinds with `kubernetes-validate --strict` for Kubernetes 1.33, the JobSet against the v0.12.0
//! CRD's openAPIV3Schema with unknown fields refused: `k8s/validate/validate_manifests.py`), a deliberately
//! broken field is caught, and the objects carry the failure rules, addresses and limits the launcher promises.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{m3d, m3d_err, m3d_ok, workspace_root};

const S3_SETS: [&str; 6] = [
    "--set",
    "data.tasks.0.shards.0=s3://m3d/shards/cap",
    "--set",
    "output.run=s3://m3d/runs/clip-tiny",
    "--set",
    "checkpoint.every=5",
];

fn recipe() -> String {
    workspace_root()
        .join("recipes/clip-tiny.yaml")
        .display()
        .to_string()
}

/// Runs the validator on `paths`; returns (success, stdout + stderr).
fn validate(paths: &[&Path]) -> (bool, String) {
    let script = workspace_root().join("k8s/validate/validate_manifests.py");
    let out = Command::new(m3d_testkit::python())
        .arg(&script)
        .args(paths)
        .output()
        .expect("spawn the manifest validator");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn render(dir: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let r = recipe();
    let d = dir.display().to_string();
    let mut args = vec!["k8s", "render", &r, "--image", "m3d:test", "-o", &d];
    args.extend(S3_SETS);
    args.extend(extra);
    m3d_ok(&args);
    listed(dir)
}

/// The files under `dir`, sorted (the render order).
fn listed(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn find<'a>(files: &'a [PathBuf], kind: &str) -> &'a PathBuf {
    files
        .iter()
        .find(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(&format!("-{kind}-"))
        })
        .unwrap_or_else(|| panic!("no {kind} among {files:?}"))
}

#[test]
fn a_rendered_jobset_passes_the_schemas_and_a_broken_field_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(
        dir.path(),
        &[
            "--workers",
            "2",
            "--queue",
            "team-a",
            "--exclusive-topology",
            "cloud.google.com/gke-nodepool",
        ],
    );
    assert_eq!(files.len(), 3, "{files:?}");
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&refs);
    assert!(ok, "{report}");
    assert_eq!(report.matches("ok ").count(), 3, "{report}");

    // The token Secret is readable by its owner only.
    let secret = find(&files, "secret");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let js = yaml(find(&files, "jobset"));
    assert_eq!(js["apiVersion"], "jobset.x-k8s.io/v1alpha2");
    assert_eq!(
        js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    assert_eq!(js["spec"]["suspend"], true);
    // A disruption fails the Job with reason PodFailurePolicy, which restarts the set without counting.
    let rule = &js["spec"]["failurePolicy"]["rules"][0];
    assert_eq!(rule["action"], "RestartJobSetAndIgnoreMaxRestarts");
    assert_eq!(rule["onJobFailureReasons"][0], "PodFailurePolicy");
    assert_eq!(js["spec"]["failurePolicy"]["maxRestarts"], 3);
    let jobs = js["spec"]["replicatedJobs"].as_array().unwrap();
    let (coord, workers) = (&jobs[0], &jobs[1]);
    assert_eq!(coord["name"], "coordinator");
    assert_eq!(
        workers["template"]["metadata"]["annotations"]
            ["alpha.jobset.sigs.k8s.io/exclusive-topology"],
        "cloud.google.com/gke-nodepool"
    );
    assert_eq!(workers["dependsOn"][0]["name"], "coordinator");
    assert_eq!(workers["dependsOn"][0]["status"], "Ready");
    for j in jobs {
        let spec = &j["template"]["spec"];
        assert_eq!(spec["backoffLimit"], 0);
        let pfp = &spec["podFailurePolicy"]["rules"][0];
        assert_eq!(pfp["action"], "FailJob");
        assert_eq!(pfp["onPodConditions"][0]["type"], "DisruptionTarget");
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Never");
        let sc = &spec["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
    }
    let wspec = &workers["template"]["spec"];
    assert_eq!(wspec["completionMode"], "Indexed");
    assert_eq!(wspec["parallelism"], 2);
    assert_eq!(wspec["completions"], 2);
    let pod = &wspec["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let name = js["metadata"]["name"].as_str().unwrap();
    let at = args.iter().position(|a| *a == "--coordinator").unwrap();
    assert_eq!(
        args[at + 1],
        format!("http://{name}-coordinator-0-0.{name}:7070")
    );
    assert!(args.contains(&"$(POD_IP)"), "{args:?}");
    // The token comes from the Secret, never from the command line.
    assert!(!args.iter().any(|a| a.contains("token")), "{args:?}");
    let env = c["env"].as_array().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"] == "M3D_TOKEN" && e["valueFrom"]["secretKeyRef"]["key"] == "token"));
    assert!(env.iter().any(
        |e| e["name"] == "POD_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ));
    let shm = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["emptyDir"]["medium"] == "Memory")
        .expect("a memory-backed /dev/shm");
    assert_eq!(shm["emptyDir"]["sizeLimit"], "1Gi");
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 90);
    let probe = &coord["template"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
    assert_eq!(probe["grpc"]["port"], 7070);

    // The ConfigMap holds the effective recipe (with the world size fixed to the pod count), under a name
    // that changes with it.
    let cm = yaml(find(&files, "configmap"));
    let text = cm["data"]["recipe.yaml"].as_str().unwrap();
    assert!(text.contains("s3://m3d/shards/cap"), "{text}");
    let other = tempfile::tempdir().unwrap();
    let files2 = render(other.path(), &["--workers", "2", "--set", "train.lr=1e-4"]);
    let cm2 = yaml(find(&files2, "configmap"));
    assert_ne!(cm["metadata"]["name"], cm2["metadata"]["name"]);

    // A misspelt field deep in the pod spec is refused by the CRD schema, naming it.
    let js_path = find(&files, "jobset");
    let text = std::fs::read_to_string(js_path).unwrap();
    let broken = text.replacen("restartPolicy: Never", "restartPolicyy: Never", 1);
    assert_ne!(broken, text);
    let bad = dir.path().join("broken.yaml");
    std::fs::write(&bad, broken).unwrap();
    let (ok, report) = validate(&[&bad]);
    assert!(!ok, "{report}");
    assert!(report.contains("restartPolicyy"), "{report}");
    // And a core object with an unknown field, by kubernetes-validate --strict.
    let cm_text = std::fs::read_to_string(find(&files, "configmap")).unwrap();
    let bad_cm = dir.path().join("broken-cm.yaml");
    std::fs::write(&bad_cm, format!("{cm_text}immutible: true\n")).unwrap();
    let (ok, report) = validate(&[&bad_cm]);
    assert!(!ok, "{report}");
}

#[test]
fn the_indexed_job_flavour_and_render_prep_pass_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(
        dir.path(),
        &[
            "--workers",
            "3",
            "--flavor",
            "indexed-job",
            "--token-secret",
            "mine",
        ],
    );
    // No Secret rendered: the existing one is referenced.
    let kinds: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!kinds.iter().any(|k| k.contains("-secret-")), "{kinds:?}");
    for k in ["-service-", "-deployment-", "-job-", "-configmap-"] {
        assert!(kinds.iter().any(|f| f.contains(k)), "{k} in {kinds:?}");
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&refs);
    assert!(ok, "{report}");
    let job = yaml(find(&files, "job"));
    assert_eq!(
        job["spec"]["podFailurePolicy"]["rules"][0]["action"],
        "Ignore"
    );

    for flavor in ["jobset", "indexed-job"] {
        let out = tempfile::tempdir().unwrap();
        let o = out.path().display().to_string();
        m3d_ok(&[
            "k8s",
            "render-prep",
            "--image",
            "m3d:test",
            "--name",
            "prep-cap",
            "--parts",
            "3",
            "--out-url",
            "s3://m3d/shards/cap",
            "--claim",
            "m3d-data:/data",
            "--flavor",
            flavor,
            "-o",
            &o,
            "--",
            "cap",
            "--src",
            "/data/M3D_Cap",
            "--out",
            "s3://m3d/shards/cap",
        ]);
        let files = listed(out.path());
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let (ok, report) = validate(&refs);
        assert!(ok, "{flavor}: {report}");
        let text: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        assert!(text.contains("$(JOB_COMPLETION_INDEX)"), "{text}");
        assert!(text.contains("finalize"), "{text}");
        // The pods run the lean binary, which takes the subcommand first.
        assert!(text.contains("- m3d-data-prep\n"), "{text}");
        assert!(!text.contains("- data-prep\n"), "{text}");
    }
}

#[test]
fn recipes_that_cannot_run_on_a_cluster_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let r = recipe();
    // The tiny recipe's shards are a local folder: a pod would not have them.
    let out = m3d(&["k8s", "render", &r, "--image", "m3d:test", "-o", &d]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data.tasks[0].shards[0]"), "{err}");
    // More workers than the recipe runs with.
    let mut args = vec!["k8s", "render", &r, "--image", "m3d:test", "--workers", "0"];
    args.extend(S3_SETS);
    let out = m3d(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--workers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A job name Kubernetes would refuse.
    let mut args = vec![
        "k8s", "render", &r, "--image", "m3d:test", "--name", "Bad_Name",
    ];
    args.extend(S3_SETS);
    let out = m3d(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad_Name"));
}

#[test]
fn the_validator_refuses_what_it_must() {
    // The validator's own checks: valid objects pass; a misspelt field, an unknown kind, a wrong type and an
    // unknown top-level field fail (k8s/validate/test_validate_manifests.py).
    let script = workspace_root().join("k8s/validate/test_validate_manifests.py");
    m3d_testkit::run_python(&script, &[]);
}

#[test]
fn a_pod_with_several_gpus_runs_one_process_per_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(
        dir.path(),
        &[
            "--workers",
            "2",
            "--gpus-per-worker",
            "4",
            "--set",
            "workers.device=cuda",
            "--set",
            "train.global_batch=32",
        ],
    );
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&refs);
    assert!(ok, "{report}");
    let js = yaml(find(&files, "jobset"));
    let c =
        &js["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at = args.iter().position(|a| *a == "--procs").unwrap();
    assert_eq!(args[at + 1], "4");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "4");
    // The world is 2 pods x 4 processes.
    let cm = yaml(find(&files, "configmap"));
    let recipe = cm["data"]["recipe.yaml"].as_str().unwrap();
    assert!(recipe.contains("min: 8"), "{recipe}");
}

#[test]
fn render_eval_passes_the_schemas_and_refuses_what_cannot_run_across_pods() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().display().to_string();
    let eval = |extra: &[&str], bench: &[&str]| {
        let mut args = vec![
            "k8s",
            "render-eval",
            "--image",
            "m3d:test",
            "--name",
            "bench",
            "--ranks",
            "3",
            "--claim",
            "m3d-models:/models",
            "--restarts",
            "1",
        ];
        args.extend(extra);
        args.push("--");
        args.extend([
            "--model",
            "/models/lamed",
            "--data",
            "s3://m3d/shards/cap",
            "--volumes",
            "s3://m3d/shards/cap",
        ]);
        args.extend(bench);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let args = eval(&["-o", &o], &["-o", "s3://m3d/bench"]);
    m3d_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let files = listed(out.path());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&refs);
    assert!(ok, "{report}");
    let set = yaml(find(&files, "jobset"));
    let jobs = set["spec"]["replicatedJobs"].as_array().unwrap();
    let args_of = |i: usize| -> Vec<String> {
        jobs[i]["template"]["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let (serve, rank) = (args_of(0), args_of(1));
    // The same evaluation on every pod: the coordinator serves it, the ranks dial it by its stable DNS name.
    assert_eq!(serve[..12], rank[..12], "{serve:?} {rank:?}");
    assert!(serve.windows(2).any(|w| w == ["--serve", "0.0.0.0:7070"]));
    assert!(serve.windows(2).any(|w| w == ["--workers", "3"]));
    assert!(serve.windows(2).any(|w| w == ["--restarts", "1"]));
    assert!(rank
        .windows(2)
        .any(|w| w == ["--coordinator", "http://bench-coordinator-0-0.bench:7070"]));
    assert_eq!(jobs[1]["template"]["spec"]["completions"], 3);
    assert_eq!(
        set["spec"]["successPolicy"]["targetReplicatedJobs"][0],
        "ranks"
    );
    find(&files, "secret");
    // An output folder one pod cannot share, and a flag that is set per pod: refused, saying why.
    let err = m3d_err(
        &eval(&[], &["-o", "/tmp/bench"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("object store"), "{err}");
    let err = m3d_err(
        &eval(&[], &["-o", "s3://m3d/bench", "--workers", "2"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("--workers is set per pod"), "{err}");

    // Without the JobSet controller: the coordinator's Job behind a Service, and an Indexed Job of ranks that
    // dial that Service; queued through Kueue as the ranks' Job.
    let plain = tempfile::tempdir().unwrap();
    let p = plain.path().display().to_string();
    let args = eval(
        &["-o", &p, "--flavor", "indexed-job", "--queue", "gpus"],
        &["-o", "s3://m3d/bench"],
    );
    m3d_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let files = listed(plain.path());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate(&refs);
    assert!(ok, "{report}");
    let mut kinds: Vec<String> = files
        .iter()
        .map(|f| yaml(f)["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["Job", "Job", "Secret", "Service"]);
    let svc = yaml(find(&files, "service"));
    let named = |suffix: &str| {
        let f = files.iter().find(|f| f.to_string_lossy().ends_with(suffix));
        yaml(f.unwrap_or_else(|| panic!("no {suffix} among {files:?}")))
    };
    let coordinator = named("-job-bench-coordinator.yaml");
    let ranks = named("-job-bench-ranks.yaml");
    let pod_of = |j: &serde_json::Value| j["spec"]["template"].clone();
    // The Service selects the coordinator's pod, and forwards to its named gRPC port.
    let selector = svc["spec"]["selector"].as_object().unwrap();
    for (k, v) in selector {
        assert_eq!(&pod_of(&coordinator)["metadata"]["labels"][k], v, "{k}");
    }
    assert_ne!(
        pod_of(&ranks)["metadata"]["labels"]["m3d.dev/role"],
        selector["m3d.dev/role"]
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "grpc");
    assert_eq!(
        pod_of(&coordinator)["spec"]["containers"][0]["ports"][0]["name"],
        "grpc"
    );
    let args_of = |j: &serde_json::Value| -> Vec<String> {
        pod_of(j)["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let (serve, rank) = (args_of(&coordinator), args_of(&ranks));
    assert_eq!(serve[..12], rank[..12], "{serve:?} {rank:?}");
    assert!(serve.windows(2).any(|w| w == ["--serve", "0.0.0.0:7070"]));
    assert!(rank
        .windows(2)
        .any(|w| w == ["--coordinator", "http://bench-coordinator:7070"]));
    assert_eq!(ranks["spec"]["completionMode"], "Indexed");
    assert_eq!(ranks["spec"]["completions"], 3);
    assert_eq!(ranks["spec"]["backoffLimit"], 1, "the --restarts budget");
    assert_eq!(ranks["spec"]["suspend"], true);
    assert_eq!(
        ranks["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "gpus"
    );
    assert!(coordinator["metadata"]["labels"]
        .get("kueue.x-k8s.io/queue-name")
        .is_none());
}
