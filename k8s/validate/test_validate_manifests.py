#!/usr/bin/env python3
"""Self-check of validate_manifests.py (plain Python, no pytest).

Builds small manifests in Python, writes them to temporary files, runs
validate_manifests.py on them as a subprocess and checks exit codes and messages.
Exits non-zero on the first failed check.  Usage: python test_validate_manifests.py
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "validate_manifests.py")


# ------------------------------------------------------------------ documents


def configmap() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "m3d-run-config", "labels": {"app.kubernetes.io/name": "m3d"}},
        "data": {"run.toml": "steps = 10\n"},
    }


def secret() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "m3d-run-token"},
        "type": "Opaque",
        "stringData": {"token": "s3cr3t"},
        "data": {"ca.crt": "aGVsbG8="},
    }


def pod_spec(role: str) -> dict:
    return {
        "restartPolicy": "Never",
        "subdomain": "m3d-run",
        "containers": [
            {
                "name": role,
                "image": "registry.example.com/m3d:0.1",
                "imagePullPolicy": "IfNotPresent",
                "args": [role, "--config", "/etc/m3d/run.toml"],
                "ports": [{"name": "grpc", "containerPort": 50051}],
                "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 5},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "grpc"}},  # int-or-string
                "resources": {
                    "limits": {"nvidia.com/gpu": 1, "memory": "16Gi", "cpu": "4"},
                    "requests": {"cpu": "500m"},
                },
                "env": [
                    {"name": "M3D_TOKEN", "valueFrom": {"secretKeyRef": {"name": "m3d-run-token", "key": "token"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "M3D_ROLE", "value": role},
                ],
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "config", "mountPath": "/etc/m3d", "readOnly": True},
                ],
            }
        ],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            {"name": "config", "configMap": {"name": "m3d-run-config"}},
        ],
    }


def replicated_job(role: str, completions: int) -> dict:
    return {
        "name": role,
        "replicas": 1,
        "template": {
            "spec": {
                "completionMode": "Indexed",
                "completions": completions,
                "parallelism": completions,
                "backoffLimit": 0,
                "podFailurePolicy": {
                    "rules": [
                        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
                    ]
                },
                "template": {
                    "metadata": {"labels": {"m3d.dev/role": role}},
                    "spec": pod_spec(role),
                },
            }
        },
    }


def jobset() -> dict:
    workers = replicated_job("workers", 2)
    workers["dependsOn"] = [{"name": "coordinator", "status": "Ready"}]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "m3d-run", "labels": {"app.kubernetes.io/name": "m3d"}},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": "m3d-run"},
            "failurePolicy": {
                "maxRestarts": 3,
                "rules": [
                    {
                        "name": "preempted",
                        "action": "RestartJobSetAndIgnoreMaxRestarts",
                        "onJobFailureReasons": ["PodFailurePolicy"],
                    }
                ],
            },
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["workers"]},
            "replicatedJobs": [replicated_job("coordinator", 1), workers],
        },
    }


def job() -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "m3d-eval"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "template": {"metadata": {"labels": {"m3d.dev/role": "eval"}}, "spec": pod_spec("eval")},
        },
    }


def service() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "m3d-coordinator"},
        "spec": {
            "clusterIP": "None",
            "selector": {"m3d.dev/role": "coordinator"},
            "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}],
        },
    }


def deployment() -> dict:
    spec = pod_spec("coordinator")
    spec["restartPolicy"] = "Always"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "m3d-coordinator"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"m3d.dev/role": "coordinator"}},
            "template": {"metadata": {"labels": {"m3d.dev/role": "coordinator"}}, "spec": spec},
        },
    }


# -------------------------------------------------------------------- harness

TMP = tempfile.mkdtemp(prefix="validate-manifests-")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
CHECKS = 0


def write(name: str, docs: list) -> str:
    path = os.path.join(TMP, name)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(docs, str):
            f.write(docs)
        else:
            yaml.safe_dump_all(docs, f, sort_keys=False)
    return path


def run(*args: str) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def check(title: str, args: list[str], rc: int, must_contain: tuple[str, ...] = ()) -> str:
    global CHECKS
    got_rc, out, secs = run(*args)
    problems = []
    if got_rc != rc:
        problems.append(f"exit status {got_rc}, expected {rc}")
    problems += [f"output lacks {s!r}" for s in must_contain if s not in out]
    if problems:
        print(f"FAILED: {title}: {'; '.join(problems)}\n--- output ---\n{out}--------------")
        sys.exit(1)
    CHECKS += 1
    print(f"passed: {title} ({secs:.2f}s)")
    return out


def check_converted_schema() -> None:
    """The converted CRD schema is a valid 2020-12 schema (skipped at run time: ~1 s)."""
    global CHECKS
    sys.path.insert(0, HERE)
    sys.dont_write_bytecode = True
    import validate_manifests as vm

    validators = vm.load_crd_validators(vm.DEFAULT_CRD)
    assert list(validators) == [("jobset.x-k8s.io/v1alpha2", "JobSet")], list(validators)
    schema = validators[("jobset.x-k8s.io/v1alpha2", "JobSet")].schema
    vm._CrdValidator.check_schema(schema)
    text = repr(schema)
    assert "x-kubernetes-" not in text, "x-kubernetes-* keys left in the converted schema"

    def open_objects(node, path="$"):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield path
            for k, v in node.items():
                if k not in ("default", "enum", "const"):
                    yield from open_objects(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from open_objects(v, f"{path}[{i}]")

    still_open = list(open_objects(schema))
    assert not still_open, f"objects that accept unknown fields: {still_open[:5]}"
    CHECKS += 1
    print("passed: converted JobSet schema is a valid JSON schema")


def main() -> None:
    check_converted_schema()
    # (1) valid documents pass: ConfigMap, Secret, JobSet, Job, Service, Deployment.
    valid = write("valid.yaml", [configmap(), secret(), jobset(), job(), service(), deployment()])
    out = check("valid documents pass", [valid], 0,
                ("ok  ConfigMap/m3d-run-config", "ok  Secret/m3d-run-token", "ok  JobSet/m3d-run",
                 "ok  Job/m3d-eval", "ok  Service/m3d-coordinator", "ok  Deployment/m3d-coordinator"))
    assert out.count("\nok  ") + out.startswith("ok  ") == 6, out
    # ... also when given as a directory, with the version spelled with a v.
    vdir = os.path.join(TMP, "dir")
    os.mkdir(vdir)
    with open(os.path.join(vdir, "a.yaml"), "w") as f:
        yaml.safe_dump(configmap(), f)
    with open(os.path.join(vdir, "b.yaml"), "w") as f:
        yaml.safe_dump(jobset(), f)
    with open(os.path.join(vdir, "ignored.txt"), "w") as f:
        f.write("not: [yaml")
    check("a directory of valid documents passes", ["--k8s-version", "v1.33.0", vdir], 0,
          ("ok  ConfigMap/m3d-run-config", "ok  JobSet/m3d-run"))

    # (2) a misspelled field deep inside the JobSet's pod spec fails.
    bad = jobset()
    c0 = bad["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"]["containers"][0]
    c0["imagePullPolicyy"] = c0.pop("imagePullPolicy")
    check("JobSet with a misspelled pod-spec field fails", [write("js-typo.yaml", [configmap(), bad])], 1,
          ("ok  ConfigMap/m3d-run-config", "FAIL JobSet/m3d-run", "imagePullPolicyy",
           "$.spec.replicatedJobs[1].template.spec.template.spec.containers[0]"))

    # (2b) wrong types / enum values / duplicate list-map keys inside the JobSet fail.
    bad = jobset()
    pod = bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"  # int32 only, not int-or-string
    pod["containers"][0]["env"].append({"name": "POD_IP", "value": "dup"})  # list-map key 'name'
    bad["spec"]["failurePolicy"]["rules"][0]["action"] = "RestartEverything"
    check("JobSet with wrong type, bad enum and duplicate env fails", [write("js-types.yaml", [bad])], 1,
          ("FAIL JobSet/m3d-run", "readinessProbe.grpc.port", "'grpc' is not of type 'integer'",
           "RestartEverything", "duplicate entry [name='POD_IP']"))

    # (2c) unknown top-level field, bad metadata, webhook-level errors in a JobSet fail.
    bad = jobset()
    bad["specs"] = {}
    check("JobSet with an unknown top-level field fails", [write("js-top.yaml", [bad])], 1, ("'specs' was unexpected",))
    bad = jobset()
    del bad["metadata"]["name"]
    check("JobSet without metadata.name fails", [write("js-noname.yaml", [bad])], 1, ("$.metadata", "name"))
    bad = jobset()
    bad["spec"]["replicatedJobs"][1]["dependsOn"] = [{"name": "nobody", "status": "Ready"}]
    bad["spec"]["failurePolicy"]["rules"][0]["targetReplicatedJobs"] = ["ghost"]
    bad["metadata"]["name"] = "m3d-run-with-a-really-long-name-that-will-not-fit-in-pod-names"
    check("JobSet failing the webhook checks fails", [write("js-webhook.yaml", [bad])], 1,
          ("cannot depend on 'nobody'", "'ghost' is not a replicatedJob", "generated Pod name"))

    # (3) a ConfigMap with an unknown top-level field fails.
    bad = configmap()
    bad["datta"] = {"x": "y"}
    check("ConfigMap with an unknown top-level field fails", [write("cm.yaml", [bad])], 1,
          ("FAIL ConfigMap/m3d-run-config", "datta"))

    # (4) a Deployment with a wrong type fails (and every error is listed).
    bad = deployment()
    bad["spec"]["replicas"] = "two"
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    check("Deployment with wrong types fails", [write("deploy.yaml", [bad])], 1,
          ("FAIL Deployment/m3d-coordinator", "$.spec.replicas", "'two' is not of type",
           "containers[0].ports[0].containerPort"))

    # (5) an unknown kind fails (kubernetes-validate only warns about it).
    unknown = {"apiVersion": "example.com/v1", "kind": "Foo", "metadata": {"name": "bar"}, "spec": {}}
    check("unknown kind fails", [write("foo.yaml", [configmap(), unknown])], 1,
          ("ok  ConfigMap/m3d-run-config", "FAIL Foo/bar", "Couldn't find schema"))
    other_jobset = dict(jobset(), apiVersion="jobset.x-k8s.io/v1alpha1")
    check("JobSet of another API version fails", [write("js-v1a1.yaml", [other_jobset])], 1,
          ("FAIL JobSet/m3d-run", "Couldn't find schema"))

    # Inputs that are not manifests.
    check("empty input fails", [write("empty.yaml", "---\n# nothing\n---\n")], 1, ("no documents",))
    check("duplicate YAML keys fail", [write("dup.yaml", "apiVersion: v1\nkind: ConfigMap\nkind: Secret\n"
                                                         "metadata: {name: x}\n")], 1, ("duplicate key",))
    check("invalid Secret data fails", [write("secret.yaml", [dict(secret(), data={"k": "not base64!"})])], 1,
          ("not valid base64",))
    check("missing CRD is a setup error", ["--jobset-crd", os.path.join(TMP, "nope.yaml"), valid], 2,
          ("CRD file not found",))
    check("unbundled Kubernetes version is a setup error", ["--k8s-version", "1.9.0", valid], 2,
          ("bundles no schemas",))
    check("missing input is a setup error", [os.path.join(TMP, "missing.yaml")], 2, ("no such file",))

    print(f"all {CHECKS} checks passed")


if __name__ == "__main__":
    main()
