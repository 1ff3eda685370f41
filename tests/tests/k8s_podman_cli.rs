//! The rendered manifests, run for real in containers. There is no Kubernetes API server here, so a small
//! harness does for each pod of a rendered JobSet what the JobSet controller and the kubelet would: the pod's
//! DNS names (`<jobset>-<job>-<index>-<pod>.<subdomain>`) as podman network aliases, `status.podIP` and
//! `metadata.name` from the downward API, env from Secrets (`secretKeyRef`, `envFrom`), the ConfigMap as
//! mounted files, `emptyDir` volumes, claims as read-only folders, `JOB_COMPLETION_INDEX`, the security context
//! (user, read-only root, no capabilities), `$(VAR)` expansion in command and args, `dependsOn` (Ready: the
//! coordinator answers; Complete: every pod exited 0), and `terminationGracePeriodSeconds` as `podman stop -t`.
//! The container's command and args are run unchanged. Not modelled: resources, probes' timing, restarts by
//! the controllers (a restart is the harness run again on the same objects).
//!
//! Needs root podman with runc (`source scripts/podman-setup.sh`, which `scripts/test.sh` does); without it the
//! test fails saying so.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{m3d_bin, m3d_ok, m3d_ok_env, workspace_root};
use serde_json::Value;

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("podman {args:?}: {e} (source scripts/podman-setup.sh)"))
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fails (never skips) when podman cannot run containers here.
fn require_podman() {
    let conf = std::env::var("CONTAINERS_CONF").unwrap_or_default();
    assert!(
        !conf.is_empty(),
        "CONTAINERS_CONF is not set: these tests run pods with podman; `source scripts/podman-setup.sh` first \
         (scripts/test.sh does)"
    );
    let out = podman(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]);
    assert!(
        out.status.success(),
        "podman cannot run here: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image with this build's `m3d`, `m3d-coordinator` and `m3d-data-prep` (k8s/image.sh: FROM scratch + their
/// library closure, nothing pulled).
fn image() -> String {
    let tag = "localhost/m3d-test:latest".to_string();
    let m3d = m3d_bin();
    let coord = m3d.with_file_name("m3d-coordinator");
    let prep = m3d.with_file_name("m3d-data-prep");
    let script = workspace_root().join("k8s/image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--tag", &tag])
        .arg(&m3d)
        .arg(&coord)
        .arg(&prep)
        .output()
        .expect("spawn k8s/image.sh");
    assert!(
        out.status.success(),
        "k8s/image.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tag
}

fn read_objects(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| serde_yaml::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Kubernetes quantities podman understands (`1Gi` -> `1g`).
fn podman_size(q: &str) -> String {
    for (k, p) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = q.strip_suffix(k) {
            return format!("{n}{p}");
        }
    }
    q.to_string()
}

/// `$(VAR)` references expanded from the container's environment, as the kubelet does.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// A podman network standing in for the cluster, and the containers started on it.
struct Cluster {
    net: String,
    subnet: String,
    next_ip: u8,
    image: String,
    namespace: String,
    secrets: HashMap<String, BTreeMap<String, String>>,
    config_maps: HashMap<String, BTreeMap<String, String>>,
    claims: HashMap<String, PathBuf>,
    scratch: PathBuf,
    containers: Vec<String>,
}

/// One started pod.
struct Pod {
    container: String,
    ip: String,
    grace: i64,
}

impl Cluster {
    fn new(image: String, scratch: &Path) -> Cluster {
        let octet = 20 + std::process::id() % 200;
        let net = format!("m3d-test-{}", std::process::id());
        let subnet = format!("10.77.{octet}");
        let _ = podman(&["network", "rm", "-f", &net]);
        podman_ok(&[
            "network",
            "create",
            "--subnet",
            &format!("{subnet}.0/24"),
            &net,
        ]);
        Cluster {
            net,
            subnet,
            next_ip: 10,
            image,
            namespace: "default".into(),
            secrets: HashMap::new(),
            config_maps: HashMap::new(),
            claims: HashMap::new(),
            scratch: scratch.to_path_buf(),
            containers: Vec::new(),
        }
    }

    /// Takes the Secrets and ConfigMaps among `objects` (as the API server would store them).
    fn apply(&mut self, objects: &[Value]) {
        for o in objects {
            let name = str_of(&o["metadata"]["name"]).to_string();
            let mut data = BTreeMap::new();
            if let Some(m) = o["stringData"].as_object() {
                for (k, v) in m {
                    data.insert(k.clone(), str_of(v).to_string());
                }
            }
            if let Some(m) = o["data"].as_object() {
                for (k, v) in m {
                    data.insert(k.clone(), str_of(v).to_string());
                }
            }
            match str_of(&o["kind"]) {
                "Secret" => {
                    assert!(o["data"].is_null(), "the harness reads stringData only");
                    self.secrets.insert(name, data);
                }
                "ConfigMap" => {
                    self.config_maps.insert(name, data);
                }
                _ => {}
            }
        }
    }

    /// Starts the pod `host` (job completion index `index`) of `template`.
    fn run_pod(&mut self, host: &str, subdomain: &str, index: usize, template: &Value) -> Pod {
        let spec = &template["spec"];
        let c = &spec["containers"][0];
        let ip = format!("{}.{}", self.subnet, self.next_ip);
        self.next_ip += 1;
        let container = format!("{}-{host}", self.net);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("JOB_COMPLETION_INDEX".into(), index.to_string());
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let name = str_of(&from["secretRef"]["name"]);
            let s = self
                .secrets
                .get(name)
                .unwrap_or_else(|| panic!("envFrom: no Secret {name}"));
            env.extend(s.clone());
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let name = str_of(&e["name"]).to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "status.podIP" => ip.clone(),
                    "metadata.name" => host.to_string(),
                    "metadata.namespace" => self.namespace.clone(),
                    other => panic!("the harness does not model fieldRef {other}"),
                }
            } else if e["valueFrom"]["secretKeyRef"].is_object() {
                let r = &e["valueFrom"]["secretKeyRef"];
                let s = self
                    .secrets
                    .get(str_of(&r["name"]))
                    .unwrap_or_else(|| panic!("no Secret {}", r["name"]));
                s.get(str_of(&r["key"]))
                    .unwrap_or_else(|| panic!("Secret {} has no key {}", r["name"], r["key"]))
                    .clone()
            } else {
                panic!("the harness does not model env {e}");
            };
            env.insert(name, value);
        }
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            container.clone(),
            "--hostname".into(),
            host.into(),
            "--network".into(),
            self.net.clone(),
            "--ip".into(),
            ip.clone(),
            "--network-alias".into(),
            format!("{host}.{subdomain}"),
            "--network-alias".into(),
            format!("{host}.{subdomain}.{}.svc.cluster.local", self.namespace),
            "--cap-drop".into(),
            "ALL".into(),
            "--security-opt".into(),
            "no-new-privileges".into(),
        ];
        let sc = &c["securityContext"];
        if let Some(u) = sc["runAsUser"].as_i64() {
            let g = sc["runAsGroup"].as_i64().unwrap_or(u);
            args.extend(["--user".into(), format!("{u}:{g}")]);
        }
        if sc["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        for (k, v) in &env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        let volumes: HashMap<&str, &Value> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (str_of(&v["name"]), v))
            .collect();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let path = str_of(&m["mountPath"]);
            let v = volumes[str_of(&m["name"])];
            if let Some(cm) = v["configMap"]["name"].as_str() {
                let files = self
                    .config_maps
                    .get(cm)
                    .unwrap_or_else(|| panic!("no ConfigMap {cm}"));
                let dir = self
                    .scratch
                    .join(format!("cm-{host}-{}", str_of(&m["name"])));
                std::fs::create_dir_all(&dir).unwrap();
                for (k, text) in files {
                    std::fs::write(dir.join(k), text).unwrap();
                }
                chmod_readable(&dir);
                args.extend(["-v".into(), format!("{}:{path}:ro", dir.display())]);
            } else if v["emptyDir"].is_object() {
                if path == "/dev/shm" {
                    let size = str_of(&v["emptyDir"]["sizeLimit"]);
                    args.push(format!("--shm-size={}", podman_size(size)));
                } else {
                    args.extend(["--tmpfs".into(), format!("{path}:rw,mode=1777")]);
                }
            } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                let dir = self
                    .claims
                    .get(claim)
                    .unwrap_or_else(|| panic!("no folder for claim {claim}"));
                args.extend(["-v".into(), format!("{}:{path}:ro", dir.display())]);
            } else {
                panic!("the harness does not model volume {v}");
            }
        }
        args.push(self.image.clone());
        for a in c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
        {
            args.push(expand(str_of(a), &env));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&refs);
        self.containers.push(container.clone());
        Pod {
            container,
            ip,
            grace: spec["terminationGracePeriodSeconds"].as_i64().unwrap_or(30),
        }
    }

    /// Starts every pod of the replicated job `rjob` of `jobset`.
    fn run_replicated_job(&mut self, jobset: &Value, rjob: &Value) -> Vec<Pod> {
        let name = str_of(&jobset["metadata"]["name"]);
        let subdomain = jobset["spec"]["network"]["subdomain"]
            .as_str()
            .unwrap_or(name)
            .to_string();
        let job = &rjob["template"]["spec"];
        let pods = job["parallelism"].as_u64().unwrap_or(1) as usize;
        (0..pods)
            .map(|i| {
                let host = format!("{name}-{}-0-{i}", str_of(&rjob["name"]));
                self.run_pod(&host, &subdomain, i, &job["template"])
            })
            .collect()
    }

    fn logs(&self, pod: &Pod) -> String {
        let out = podman(&["logs", &pod.container]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The exit code of `pod` once it has exited (at most `limit`).
    fn wait_exit(&self, pod: &Pod, limit: Duration) -> i64 {
        let start = Instant::now();
        loop {
            let state = podman_ok(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                &pod.container,
            ]);
            if let Some(code) = state.strip_prefix("exited ") {
                return code.parse().unwrap();
            }
            assert!(
                start.elapsed() < limit,
                "{} still {state} after {limit:?}: {}",
                pod.container,
                self.logs(pod)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `podman stop -t <grace>` of every pod at once (SIGTERM, SIGKILL after the grace period).
    fn stop_all(&self, pods: &[&Pod]) {
        let children: Vec<_> = pods
            .iter()
            .map(|p| {
                Command::new("podman")
                    .args(["stop", "-t", &p.grace.to_string(), &p.container])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("podman stop")
            })
            .collect();
        for mut c in children {
            c.wait().expect("podman stop");
        }
    }

    fn remove_all(&mut self) {
        for c in std::mem::take(&mut self.containers) {
            let _ = podman(&["rm", "-f", "-t", "0", &c]);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.remove_all();
        let _ = podman(&["network", "rm", "-f", &self.net]);
    }
}

/// The container user (65532) reads what the test wrote as root.
fn chmod_readable(path: &Path) {
    let ok = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn s3_env(s3: &m3d_testkit::S3Server) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", s3.endpoint()),
    ]
}

/// The object-store Secret the pods get (`--s3-secret m3d-s3`), pointing at the host's S3 server through the
/// network's gateway. By address, not `host.containers.internal`: moto would take `host` for a bucket
/// (virtual-hosted-style addressing).
fn s3_secret(dir: &Path, s3: &m3d_testkit::S3Server, cluster: &Cluster) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: m3d-s3\nstringData:\n  AWS_ACCESS_KEY_ID: test\n  \
         AWS_SECRET_ACCESS_KEY: test\n  AWS_REGION: us-east-1\n  AWS_ENDPOINT_URL: http://{}.1:{}\n",
        cluster.subnet, s3.port
    );
    std::fs::write(dir.join("00-secret-m3d-s3.yaml"), text).unwrap();
}

#[test]
fn render_prep_parts_in_containers_equal_one_conversion_and_the_rendered_jobset_trains_stops_and_resumes(
) {
    require_podman();
    let dir = tempfile::tempdir().unwrap();
    chmod_readable(dir.path());
    let s3 = m3d_testkit::S3Server::start_on(&dir.path().join("moto.log"), "0.0.0.0");
    s3.create_bucket("m3d");
    let env_owned = s3_env(&s3);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let raw = dir.path().join("raw");
    m3d_ok(&[
        "data-prep",
        "synth",
        raw.to_str().unwrap(),
        "--cap-cases",
        "12",
        "--slice-size",
        "64x64",
    ]);
    chmod_readable(&raw);
    let image = image();
    let scratch = dir.path().join("pods");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cluster = Cluster::new(image.clone(), &scratch);
    cluster.claims.insert("m3d-raw".into(), raw.clone());

    // 1. Data prep across 3 pods, then finalize: the same objects as one conversion on the host.
    let prep = dir.path().join("prep");
    m3d_ok(&[
        "k8s",
        "render-prep",
        "--image",
        &image,
        "--name",
        "prep-cap",
        "--parts",
        "3",
        "--out-url",
        "s3://m3d/shards/cap",
        "--s3-secret",
        "m3d-s3",
        "--claim",
        "m3d-raw:/data",
        "-o",
        prep.to_str().unwrap(),
        "--",
        "cap",
        "--src",
        "/data/M3D_Cap",
        "--out",
        "s3://m3d/shards/cap",
        "--shard-volumes",
        "4",
    ]);
    s3_secret(&prep, &s3, &cluster);
    let objects = read_objects(&prep);
    cluster.apply(&objects);
    let jobset = objects.iter().find(|o| o["kind"] == "JobSet").unwrap();
    let rjobs = jobset["spec"]["replicatedJobs"].as_array().unwrap();
    assert_eq!(rjobs[1]["dependsOn"][0]["status"], "Complete");
    let parts = cluster.run_replicated_job(jobset, &rjobs[0]);
    assert_eq!(parts.len(), 3);
    for p in &parts {
        assert_eq!(
            cluster.wait_exit(p, Duration::from_secs(300)),
            0,
            "{}",
            cluster.logs(p)
        );
    }
    let fin = cluster.run_replicated_job(jobset, &rjobs[1]);
    assert_eq!(
        cluster.wait_exit(&fin[0], Duration::from_secs(300)),
        0,
        "{}",
        cluster.logs(&fin[0])
    );
    m3d_ok_env(
        &[
            "data-prep",
            "cap",
            "--src",
            raw.join("M3D_Cap").to_str().unwrap(),
            "--out",
            "s3://m3d/single/cap",
            "--shard-volumes",
            "4",
        ],
        &env,
    );
    let strip = |prefix: &str| -> Vec<String> {
        s3.keys("m3d", prefix)
            .iter()
            .map(|k| k.trim_start_matches(prefix).to_string())
            .filter(|k| !k.starts_with("parts/"))
            .collect()
    };
    let a = strip("shards/cap/");
    let b = strip("single/cap/");
    assert!(a.iter().any(|k| k.starts_with("volumes/")), "{a:?}");
    assert_eq!(
        a, b,
        "the pods' dataset and the single conversion hold different objects"
    );
    for (k, v) in &env_owned {
        std::env::set_var(k, v);
    }
    let pods_store = m3d_store::Store::open("s3://m3d/shards/cap").unwrap();
    let single_store = m3d_store::Store::open("s3://m3d/single/cap").unwrap();
    for k in a.iter().filter(|k| *k != "manifest.json") {
        assert_eq!(
            pods_store.get(k).unwrap(),
            single_store.get(k).unwrap(),
            "{k} differs"
        );
    }
    cluster.remove_all();

    // 2. The rendered JobSet: coordinator + 2 workers train on the pods' dataset with everything in S3.
    let render = dir.path().join("train");
    let recipe = workspace_root().join("recipes/clip-tiny.yaml");
    m3d_ok(&[
        "k8s",
        "render",
        recipe.to_str().unwrap(),
        "--image",
        &image,
        "--workers",
        "2",
        "--s3-secret",
        "m3d-s3",
        // Generous: a stop takes seconds here, but moto (single process, on a loaded 2-core machine) has been
        // seen to leave the coordinator's last state write waiting ~40 s; a SIGKILL would fail the test.
        "--grace-period",
        "150",
        "--set",
        "data.tasks.0.shards.0=s3://m3d/shards/cap",
        "--set",
        "output.run=s3://m3d/runs/clip",
        "--set",
        "output.metrics_flush_s=0",
        "--set",
        "checkpoint.every=100000",
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.log_every=1",
        "-o",
        render.to_str().unwrap(),
    ]);
    s3_secret(&render, &s3, &cluster);
    let objects = read_objects(&render);
    cluster.apply(&objects);
    let token = objects
        .iter()
        .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] != "m3d-s3")
        .map(|o| str_of(&o["stringData"]["token"]).to_string())
        .unwrap();
    let jobset = objects
        .iter()
        .find(|o| o["kind"] == "JobSet")
        .unwrap()
        .clone();
    let run_job = |cluster: &mut Cluster| -> (Pod, Vec<Pod>, String) {
        let rjobs = jobset["spec"]["replicatedJobs"].as_array().unwrap();
        let mut coord = cluster.run_replicated_job(&jobset, &rjobs[0]);
        let coord = coord.remove(0);
        let url = format!("http://{}:7070", coord.ip);
        // dependsOn Ready: the coordinator answers.
        let start = Instant::now();
        loop {
            let out = Command::new(m3d_bin())
                .args(["status", "--coordinator", &url, "--json"])
                .env("M3D_TOKEN", &token)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the coordinator did not become ready: {}",
                cluster.logs(&coord)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let workers = cluster.run_replicated_job(&jobset, &rjobs[1]);
        (coord, workers, url)
    };
    let step_of = |url: &str| -> u64 {
        let out = Command::new(m3d_bin())
            .args(["status", "--coordinator", url, "--json"])
            .env("M3D_TOKEN", &token)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)["step"]
            .as_u64()
            .unwrap_or(0)
    };
    let started = Instant::now();
    let (coord, workers, url) = run_job(&mut cluster);
    let mut first_step = None;
    loop {
        let step = step_of(&url);
        if first_step.is_none() && step >= 1 {
            first_step = Some(started.elapsed());
        }
        if step >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no progress: {}\n{}",
            cluster.logs(&coord),
            cluster.logs(&workers[0])
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "containers: first step after {:?}, step 3 after {:?}",
        first_step,
        started.elapsed()
    );
    // Node drain / preemption of every pod: SIGTERM, then SIGKILL after the rendered grace period.
    let stopping = Instant::now();
    let all: Vec<&Pod> = workers.iter().chain([&coord]).collect();
    cluster.stop_all(&all);
    for p in &all {
        assert_eq!(
            cluster.wait_exit(p, Duration::from_secs(5)),
            143,
            "{}",
            cluster.logs(p)
        );
    }
    println!("SIGTERM to exit: {:?}", stopping.elapsed());
    if stopping.elapsed() > Duration::from_secs(20) {
        for p in &all {
            eprintln!("--- {}\n{}", p.container, cluster.logs(p));
        }
    }
    let committed: Vec<u64> = s3
        .keys("m3d", "runs/clip/checkpoints/")
        .iter()
        .filter(|k| k.ends_with("/COMMIT"))
        .filter_map(|k| {
            k.trim_start_matches("runs/clip/checkpoints/step-")
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(committed.len(), 1, "{committed:?}");
    let saved = committed[0];
    let status = m3d_ok_env(&["status", "--run", "s3://m3d/runs/clip", "--json"], &env);
    let last = serde_json::from_str::<Value>(&status).unwrap()["last"]["step"]
        .as_u64()
        .unwrap();
    assert!(
        saved >= 3 && last <= saved,
        "checkpoint {saved}, metrics up to {last}"
    );
    let logs: Vec<String> = all.iter().map(|p| cluster.logs(p)).collect();
    cluster.remove_all();

    // 3. The JobSet restarted (the same objects run again): it resumes from the SIGTERM checkpoint.
    let (coord2, workers2, url2) = run_job(&mut cluster);
    let start = Instant::now();
    while step_of(&url2) <= saved {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no progress after the restart: {}\n{}",
            cluster.logs(&coord2),
            cluster.logs(&workers2[0])
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let resumed: String = workers2.iter().map(|w| cluster.logs(w)).collect();
    assert!(
        resumed.contains("resumed from checkpoint")
            && resumed.contains(&format!("\"step\":{saved}")),
        "{resumed}"
    );
    let mut all_logs = logs;
    all_logs.push(cluster.logs(&coord2));
    all_logs.push(resumed);
    for l in &all_logs {
        assert!(!l.contains(&token), "a log shows the token");
    }
    cluster.remove_all();

    // bench/k8s_start.sh: the same job (the ConfigMap's recipe, a fresh run) as local processes, timed as the
    // containers were above, to the first finished step. Printed, not asserted.
    if std::env::var_os("M3D_K8S_BENCH").is_some() {
        let cm = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        let recipe_file = dir.path().join("recipe.yaml");
        std::fs::write(&recipe_file, str_of(&cm["data"]["recipe.yaml"])).unwrap();
        let recipe_file = recipe_file.display().to_string();
        let set = ["--set", "output.run=s3://m3d/runs/clip-local"];
        let log = |n: &str| std::fs::File::create(dir.path().join(n)).unwrap();
        let started = Instant::now();
        let mut coord = Command::new(m3d_bin().with_file_name("m3d-coordinator"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--state",
                "s3://m3d/runs/clip-local/coordinator",
            ])
            .args(["--recipe", &recipe_file])
            .args(set)
            .envs(env.iter().copied())
            .env("M3D_TOKEN", &token)
            .stdout(std::process::Stdio::piped())
            .stderr(log("local-coordinator.log"))
            .spawn()
            .unwrap();
        let url = format!("http://{}", common::listening_address(&mut coord));
        let mut workers: Vec<_> = (0..2)
            .map(|i| {
                Command::new(m3d_bin())
                    .args(["worker", "--coordinator", &url, "--recipe", &recipe_file])
                    .args(set)
                    .args(["--worker-id", &format!("worker-{i}")])
                    .envs(env.iter().copied())
                    .env("M3D_TOKEN", &token)
                    .stdout(std::process::Stdio::null())
                    .stderr(log(&format!("local-w{i}.log")))
                    .spawn()
                    .unwrap()
            })
            .collect();
        while step_of(&url) < 1 {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "local job: no step"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        println!("local processes: first step after {:?}", started.elapsed());
        for w in &mut workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = coord.kill();
        let _ = coord.wait();
    }
}

#[test]
fn the_rendered_eval_runs_a_coordinator_pod_and_two_rank_pods_into_s3_with_the_hosts_results() {
    require_podman();
    let dir = tempfile::tempdir().unwrap();
    chmod_readable(dir.path());
    let s3 = m3d_testkit::S3Server::start_on(&dir.path().join("moto.log"), "0.0.0.0");
    s3.create_bucket("m3d");
    let env_owned = s3_env(&s3);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let raw = dir.path().join("raw");
    m3d_ok(&[
        "data-prep",
        "synth",
        raw.to_str().unwrap(),
        "--cap-cases",
        "8",
    ]);
    // The same captions on the host and in S3 (the pods read S3).
    let cap = dir.path().join("cap");
    let src = raw.join("M3D_Cap");
    for out in [cap.to_str().unwrap(), "s3://m3d/shards/cap"] {
        m3d_ok_env(
            &[
                "data-prep",
                "cap",
                "--src",
                src.to_str().unwrap(),
                "--out",
                out,
            ],
            &env,
        );
    }
    // A tiny LaMed trained a step on the host; the pods read it from a claim.
    let run = dir.path().join("lamed");
    m3d_ok(&[
        "train",
        workspace_root()
            .join("recipes/lamed-stage1-tiny.yaml")
            .to_str()
            .unwrap(),
        "--workers",
        "1",
        "--set",
        &format!("data.tasks=[{{task: cap, shards: [{}]}}]", cap.display()),
        "--set",
        "train.max_steps=1",
        "--set",
        "workers.max=1",
        "--set",
        &format!("output.run={}", run.display()),
    ]);
    chmod_readable(dir.path());
    // METEOR off on both sides: the image has no WordNet. A heartbeat timeout of a minute rather than 10 s: on
    // CI's two cores these pods start libtorch beside the rest of the suite, and a rank whose beats (each call
    // with a 5 s deadline) are late twice in a row is declared lost, which is not what this test is about.
    let bench = ["--tasks", "cap", "--limit", "5", "--max-new-tokens", "4"];
    let bench = [
        &bench[..],
        &[
            "--device",
            "cpu",
            "--wordnet",
            "/none",
            "--heartbeat-timeout",
            "60s",
        ],
    ]
    .concat();
    let host = dir.path().join("host");
    let model = run.join("final");
    let mut args = vec!["eval", "bench", "--model", model.to_str().unwrap()];
    args.extend([
        "--data",
        cap.to_str().unwrap(),
        "-o",
        host.to_str().unwrap(),
    ]);
    args.extend(&bench);
    m3d_ok(&args);

    let render = dir.path().join("render");
    let mut args = vec!["k8s", "render-eval", "--image"];
    let image = image();
    args.extend([image.as_str(), "--name", "bench", "--ranks", "2"]);
    args.extend(["--s3-secret", "m3d-s3", "--claim", "m3d-models:/models"]);
    args.extend(["-o", render.to_str().unwrap(), "--"]);
    args.extend(["--model", "/models/final", "--data", "s3://m3d/shards/cap"]);
    args.extend(["-o", "s3://m3d/bench"]);
    args.extend(&bench);
    m3d_ok(&args);
    let scratch = dir.path().join("pods");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cluster = Cluster::new(image.clone(), &scratch);
    cluster.claims.insert("m3d-models".into(), run.clone());
    s3_secret(&render, &s3, &cluster);
    let objects = read_objects(&render);
    cluster.apply(&objects);
    let jobset = objects.iter().find(|o| o["kind"] == "JobSet").unwrap();
    let rjobs = jobset["spec"]["replicatedJobs"].as_array().unwrap();
    let coordinator = cluster.run_replicated_job(jobset, &rjobs[0]);
    let ranks = cluster.run_replicated_job(jobset, &rjobs[1]);
    assert_eq!(ranks.len(), 2);
    let exits: Vec<i64> = ranks
        .iter()
        .chain(&coordinator)
        .map(|p| cluster.wait_exit(p, Duration::from_secs(300)))
        .collect();
    // Every pod's logs on a failure: a rank's failure shows in the others only as a lost coordinator.
    assert!(
        exits.iter().all(|&e| e == 0),
        "exits {exits:?}\n{}",
        ranks
            .iter()
            .chain(&coordinator)
            .map(|p| cluster.logs(p))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    // Rank 0 merged the two ranks' parts: the report in S3 holds what one process on the host found.
    let keys = s3.keys("m3d", "bench/");
    for k in [
        "bench/parts/rank-0-of-2.json",
        "bench/parts/rank-1-of-2.json",
        "bench/results.jsonl",
        "bench/bench.md",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
    }
    assert!(
        keys.iter().any(|k| k.starts_with("bench/parts/items-")),
        "no result file in {keys:?}"
    );
    for (k, v) in &env_owned {
        std::env::set_var(k, v);
    }
    let store = m3d_store::Store::open("s3://m3d/bench").unwrap();
    assert_eq!(
        String::from_utf8(store.get("results.jsonl").unwrap().to_vec()).unwrap(),
        std::fs::read_to_string(host.join("results.jsonl")).unwrap()
    );
    cluster.remove_all();
}
