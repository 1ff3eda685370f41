"""Oracle: the m3d wire contract as a client outside Rust sees it. Generates a Python gRPC client from
proto/proto/m3d/{v1,v2}/coordinator.proto with the reference protoc (grpcio-tools' `python -m grpc_tools.protoc`),
checks that every v1 message is wire-identical to its v2 counterpart (same field numbers, names, types), then talks
to a running `m3d coordinator` with the generated stubs.

Usage: proto_client.py <proto root> <out dir> <coordinator host:port> <token>
The coordinator must be fresh (job pending, nobody registered) and expect `token`, with min/max workers 1.
Prints one JSON object with what it saw (tests/tests/proto_python_client.rs checks it); exits non-zero when
protoc fails or the two packages' messages differ.
"""
import json
import subprocess
import sys

# v1 names that v2 changed (messages; methods). Every other message, and both enums, keep their names.
RENAMED = {
    "PeersRequest": "GetPeersRequest",
    "PeersResponse": "GetPeersResponse",
    "HeartbeatRequest": "SendHeartbeatRequest",
    "HeartbeatResponse": "SendHeartbeatResponse",
    "DataPlanRequest": "GetDataPlanRequest",
    "DataPlanResponse": "GetDataPlanResponse",
    "ProgressRequest": "ReportProgressRequest",
    "ProgressResponse": "ReportProgressResponse",
    "CheckpointBarrierRequest": "WaitCheckpointBarrierRequest",
    "CheckpointBarrierResponse": "WaitCheckpointBarrierResponse",
    "JobStatusRequest": "GetJobStatusRequest",
    "WatchRequest": "WatchJobStatusRequest",
}
METHODS = {
    "Register": "Register",
    "GetPeers": "GetPeers",
    "Heartbeat": "SendHeartbeat",
    "GetDataPlan": "GetDataPlan",
    "ReportProgress": "ReportProgress",
    "CheckpointBarrier": "WaitCheckpointBarrier",
    "CommitCheckpoint": "CommitCheckpoint",
    "JobStatus": "GetJobStatus",
    "Watch": "WatchJobStatus",
}
# v1 methods answering a bare JobStatus, which v2 carries in field 1 (`status`) of <Method>Response.
WRAPPED = {"JobStatus", "Watch"}
# Methods added to v2 after v1 was frozen (v1 gets no new methods), with their request and response messages.
V2_ONLY = {"LeaseWork"}


def generate(root, out):
    """Runs protoc on both packages; returns the generated files."""
    files = []
    for version in ("v1", "v2"):
        proto = f"m3d/{version}/coordinator.proto"
        r = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={out}",
             f"--grpc_python_out={out}", proto],
            capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            sys.exit(f"protoc {proto} failed ({r.returncode}):\n{r.stderr}")
        files += [f"m3d/{version}/coordinator_pb2.py", f"m3d/{version}/coordinator_pb2_grpc.py"]
    return files


def fields(message, rename):
    return sorted(
        (f.number, f.name, f.type, f.is_repeated,
         rename(f.message_type.name) if f.message_type else None,
         f.enum_type.name if f.enum_type else None)
        for f in message.fields)


def check_wire_identical(v1, v2):
    """Asserts that each v1 message has a v2 counterpart with the same fields; returns how many pairs."""
    d1, d2 = v1.DESCRIPTOR, v2.DESCRIPTOR
    v2_name = lambda n: RENAMED.get(n, n)
    for name, m1 in d1.message_types_by_name.items():
        m2 = d2.message_types_by_name[v2_name(name)]
        a, b = fields(m1, v2_name), fields(m2, lambda n: n)
        assert a == b, f"v1 {name} and v2 {m2.name} differ:\n{a}\n{b}"
    extra = set(d2.message_types_by_name) - {v2_name(n) for n in d1.message_types_by_name}
    v2_only = {f"{m}{part}" for m in V2_ONLY for part in ("Request", "Response")}
    assert extra == {"GetJobStatusResponse", "WatchJobStatusResponse"} | v2_only, extra
    for name in extra - v2_only:
        (f,) = d2.message_types_by_name[name].fields
        assert (f.number, f.name, f.message_type.full_name, f.is_repeated) == (1, "status", "m3d.v2.JobStatus", False)
    assert d1.enum_types_by_name.keys() == d2.enum_types_by_name.keys()
    for name, e1 in d1.enum_types_by_name.items():
        e2 = d2.enum_types_by_name[name]
        assert [(v.name, v.number) for v in e1.values] == [(v.name, v.number) for v in e2.values], name
    s1 = d1.services_by_name["Coordinator"]
    s2 = d2.services_by_name["CoordinatorService"]
    assert len(s1.methods) == len(METHODS) and len(s2.methods) == len(METHODS) + len(V2_ONLY)
    assert V2_ONLY <= set(s2.methods_by_name), V2_ONLY
    for m1 in s1.methods:
        m2 = s2.methods_by_name[METHODS[m1.name]]
        assert (m1.client_streaming, m1.server_streaming) == (m2.client_streaming, m2.server_streaming), m1.name
        assert v2_name(m1.input_type.name) == m2.input_type.name, m1.name
        if m1.name in WRAPPED:
            assert (m1.output_type.name, m2.output_type.name) == ("JobStatus", m2.name + "Response"), m1.name
        else:
            assert v2_name(m1.output_type.name) == m2.output_type.name, m1.name
    return len(d1.message_types_by_name)


def main():
    root, out, addr, token = sys.argv[1:5]
    generated = generate(root, out)
    sys.path.insert(0, out)
    import grpc
    from google.protobuf import json_format
    from m3d.v1 import coordinator_pb2 as v1, coordinator_pb2_grpc as v1_grpc
    from m3d.v2 import coordinator_pb2 as v2, coordinator_pb2_grpc as v2_grpc

    report = {"generated": generated, "wire_identical_pairs": check_wire_identical(v1, v2)}
    auth = [("authorization", f"Bearer {token}")]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub2 = v2_grpc.CoordinatorServiceStub(channel)
    stub1 = v1_grpc.CoordinatorStub(channel)

    def refused(call, metadata):
        try:
            call(metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            return e.code().name
        return "OK"

    report["refused"] = {
        "v2_without_token": refused(lambda **kw: stub2.GetJobStatus(v2.GetJobStatusRequest(), **kw), None),
        "v2_wrong_token": refused(lambda **kw: stub2.GetJobStatus(v2.GetJobStatusRequest(), **kw),
                                  [("authorization", f"Bearer {token}x")]),
        "v2_register_without_token": refused(
            lambda **kw: stub2.Register(v2.RegisterRequest(worker_id="intruder", capabilities=v2.Capabilities()),
                                        **kw), None),
        "v1_without_token": refused(lambda **kw: stub1.JobStatus(v1.JobStatusRequest(), **kw), None),
        "v1_wrong_token": refused(lambda **kw: stub1.JobStatus(v1.JobStatusRequest(), **kw),
                                  [("authorization", f"Bearer not-{token}")]),
    }
    as_dict = lambda m: json_format.MessageToDict(m, preserving_proto_field_name=True)

    before = stub2.GetJobStatus(v2.GetJobStatusRequest(), metadata=auth, timeout=30).status
    report["before"] = as_dict(before)
    report["before"]["state_name"] = v2.JobState.Name(before.state)

    reg = stub2.Register(
        v2.RegisterRequest(worker_id="py-0", host="py-host", collective_addr="127.0.0.1:1",
                           capabilities=v2.Capabilities(gpus=0)),
        metadata=auth, timeout=120)
    report["register"] = {"rank": reg.rank, "world_size": reg.world_size, "generation": reg.generation,
                          "local_rank": reg.local_rank, "local_world_size": reg.local_world_size,
                          "peers": len(reg.peers), "plan": as_dict(reg.plan),
                          "heartbeat_interval_ms": reg.heartbeat_interval_ms}
    gen = reg.generation

    hb = stub2.SendHeartbeat(v2.SendHeartbeatRequest(worker_id="py-0", generation=gen), metadata=auth, timeout=30)
    report["heartbeat"] = v2.WorkerAction.Name(hb.action)
    plan = stub2.GetDataPlan(v2.GetDataPlanRequest(worker_id="py-0", generation=gen, start_step=0, steps=2),
                             metadata=auth, timeout=30)
    report["data_plan"] = [{"step": s.step, "samples": list(s.samples)} for s in plan.steps]
    peers = stub2.GetPeers(v2.GetPeersRequest(worker_id="py-0", generation=gen, start_rank=0, count=16),
                           metadata=auth, timeout=30)
    report["peers"] = [p.worker_id for p in peers.peers]
    # A v2-only method on its wire path: this is a training job, whose ranks follow the data plan.
    try:
        stub2.LeaseWork(v2.LeaseWorkRequest(worker_id="py-0", generation=gen, max_items=4), metadata=auth,
                        timeout=30)
        report["lease_work"] = "OK"
    except grpc.RpcError as e:
        report["lease_work"] = f"{e.code().name}: {e.details()}"

    after = stub2.GetJobStatus(v2.GetJobStatusRequest(), metadata=auth, timeout=30).status
    report["after"] = as_dict(after)
    report["after"]["state_name"] = v2.JobState.Name(after.state)
    watched = stub2.WatchJobStatus(v2.WatchJobStatusRequest(), metadata=auth, timeout=30)
    first = next(watched).status
    watched.cancel()
    report["v2_watch_first_equals_status"] = first == after

    # The deprecated v1, from its own generated stubs, on its unchanged paths.
    s1 = stub1.JobStatus(v1.JobStatusRequest(), metadata=auth, timeout=30)
    raw = channel.unary_unary("/m3d.v1.Coordinator/JobStatus",
                              request_serializer=v1.JobStatusRequest.SerializeToString,
                              response_deserializer=v1.JobStatus.FromString)
    s1_raw = raw(v1.JobStatusRequest(), metadata=auth, timeout=30)
    watched = stub1.Watch(v1.WatchRequest(), metadata=auth, timeout=30)
    w1 = next(watched)
    watched.cancel()
    hb1 = stub1.Heartbeat(v1.HeartbeatRequest(worker_id="py-0", generation=gen), metadata=auth, timeout=30)
    try:
        stub1.GetDataPlan(v1.DataPlanRequest(worker_id="nobody", generation=gen, start_step=0, steps=1),
                          metadata=auth, timeout=30)
        unknown = "OK"
    except grpc.RpcError as e:
        unknown = e.code().name
    report["v1"] = {
        "status": as_dict(s1),
        "state_name": v1.JobState.Name(s1.state),
        # Wire-identical: v1's JobStatus bytes are v2's.
        "same_bytes_as_v2": s1.SerializeToString(deterministic=True) == after.SerializeToString(deterministic=True),
        "raw_path_equals_stub": s1_raw == s1,
        "watch_first_equals_status": w1 == s1,
        "heartbeat": v1.WorkerAction.Name(hb1.action),
        "unknown_worker": unknown,
    }
    channel.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
