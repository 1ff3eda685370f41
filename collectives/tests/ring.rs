//! RingTcp and Bucketer on loopback: ranks are threads of this process (each with its own sockets), except the
//! killed-peer test, which runs one rank as a real child process and SIGKILLs it mid-operation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use half::bf16;
use m3d_collectives::{Bucketer, Collective, CollectiveError, ReduceOp, RingListener, RingTcp};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs `f(rank, ring)` for every rank of a fresh ring of `world` threads; results in rank order.
fn run_ranks<R: Send>(
    world: usize,
    chunk_bytes: usize,
    f: impl Fn(usize, RingTcp) -> R + Sync,
) -> Vec<R> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind(loopback()).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, f) = (&addrs, &f);
                s.spawn(move || {
                    let mut ring = l.join(rank, world, addrs, TIMEOUT).unwrap();
                    ring.set_chunk_bytes(chunk_bytes);
                    f(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Integer-valued data (exact in f32/f64 sums) distinct per rank and index.
fn value(rank: usize, i: usize) -> f64 {
    ((i * 7 + rank * 13) % 1000) as f64 - 300.0
}

#[test]
fn all_reduce_sums_exactly_for_worlds_1_to_4_and_odd_sizes() {
    // Sizes not divisible by the world, smaller than the world (empty segments), and spanning many chunks.
    let sizes = [0usize, 1, 2, 3, 5, 17, 1000, 12_345, 100_003];
    for world in 1..=4 {
        let results = run_ranks(world, 4096, |rank, mut ring| {
            assert_eq!((ring.rank(), ring.world_size()), (rank, world));
            let mut out = Vec::new();
            for &n in &sizes {
                let data: Vec<f32> = (0..n).map(|i| value(rank, i) as f32).collect();
                let mut t = Tensor::from_slice(&data);
                ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                out.push(Vec::<f32>::try_from(&t).unwrap());
                let data: Vec<f64> = (0..n).map(|i| value(rank, i) + 0.5).collect();
                let mut t = Tensor::from_slice(&data);
                ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                out.push(Vec::<f32>::try_from(&t.to_kind(Kind::Float)).unwrap());
            }
            out
        });
        let mut k = 0;
        for &n in &sizes {
            let want32: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| value(r, i)).sum::<f64>() as f32)
                .collect();
            let want64: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| value(r, i) + 0.5).sum::<f64>() as f32)
                .collect();
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got[k], want32, "f32 world {world} size {n} rank {rank}");
                assert_eq!(got[k + 1], want64, "f64 world {world} size {n} rank {rank}");
            }
            k += 2;
        }
    }
}

#[test]
fn bf16_and_mean_reduce_correctly() {
    let world = 3;
    let results = run_ranks(world, 4096, |rank, mut ring| {
        // Small integers are exact in bf16 (and so are their sums up to 256).
        let data: Vec<f32> = (0..5000).map(|i| ((i % 16) + rank) as f32).collect();
        let mut b = Tensor::from_slice(&data).to_kind(Kind::BFloat16);
        ring.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(b.kind(), Kind::BFloat16);
        let mut m = Tensor::from_slice(&data);
        ring.all_reduce(&mut m, ReduceOp::Mean).unwrap();
        (
            Vec::<f32>::try_from(&b.to_kind(Kind::Float)).unwrap(),
            Vec::<f32>::try_from(&m).unwrap(),
        )
    });
    let sum: Vec<f32> = (0..5000).map(|i| (3 * (i % 16) + 3) as f32).collect();
    let mean: Vec<f32> = (0..5000).map(|i| ((i % 16) + 1) as f32).collect();
    for (b, m) in results {
        assert_eq!(b, sum);
        assert_eq!(m, mean);
    }
    // bf16 element type straight through the slice API too.
    let results = run_ranks(2, 64, |rank, mut ring| {
        let mut v: Vec<bf16> = (0..99)
            .map(|i| bf16::from_f32((i % 8 + rank) as f32))
            .collect();
        ring.all_reduce_slice(&mut v).unwrap();
        v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()
    });
    for got in results {
        assert_eq!(
            got,
            (0..99)
                .map(|i| (2 * (i % 8) + 1) as f32)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn random_floats_give_identical_bits_on_every_rank() {
    for world in [2, 3, 4] {
        let results = run_ranks(world, 1000, |rank, mut ring| {
            tch::manual_seed(rank as i64 + 100);
            let mut t = Tensor::randn([77_777], (Kind::Float, tch::Device::Cpu));
            let mine = t.copy();
            ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            (mine, Vec::<f32>::try_from(&t).unwrap())
        });
        let first = &results[0].1;
        for (_, got) in &results[1..] {
            // Bitwise: one reduction order for every rank.
            assert!(
                got.iter()
                    .zip(first)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "world {world}"
            );
        }
        let inputs: Vec<Tensor> = results.iter().map(|(m, _)| m.shallow_clone()).collect();
        let want = Tensor::stack(&inputs, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        let got = Tensor::from_slice(first);
        assert!(
            got.allclose(&want, 1e-5, 1e-5, false),
            "world {world}: ring sum differs from the sum"
        );
    }
}

#[test]
fn non_contiguous_tensor_is_reduced_in_place() {
    let results = run_ranks(2, 4096, |rank, mut ring| {
        let base = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]) + rank as f64;
        let mut t = base.tr(); // a transposed view: not contiguous
        assert!(!t.is_contiguous());
        ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        Vec::<f32>::try_from(&base.view([-1])).unwrap()
    });
    let want: Vec<f32> = (0..12).map(|i| (2 * i + 1) as f32).collect();
    for got in results {
        assert_eq!(got, want, "the original storage holds the sum");
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in [1, 3, 4] {
        let results = run_ranks(world, 16, |rank, mut ring| {
            let t = Tensor::from_slice(&[rank as f32 * 10.0, rank as f32 * 10.0 + 1.0, 7.0])
                .view([1, 3]);
            let g = ring.all_gather(&t).unwrap();
            let scalar = ring.all_gather(&Tensor::from(rank as f64 + 0.25)).unwrap();
            (
                g.size(),
                Vec::<f32>::try_from(&g.view([-1])).unwrap(),
                Vec::<f64>::try_from(&scalar).unwrap(),
            )
        });
        let want: Vec<f32> = (0..world)
            .flat_map(|r| [r as f32 * 10.0, r as f32 * 10.0 + 1.0, 7.0])
            .collect();
        for (size, got, scalars) in results {
            assert_eq!(size, vec![world as i64, 3]);
            assert_eq!(got, want);
            assert_eq!(
                scalars,
                (0..world).map(|r| r as f64 + 0.25).collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    let world = 4;
    let results = run_ranks(world, 512, |rank, mut ring| {
        let mut seen = Vec::new();
        for root in 0..world {
            let mut t = Tensor::full([3001], rank as f64, (Kind::Double, tch::Device::Cpu));
            ring.broadcast(&mut t, root).unwrap();
            seen.push(Vec::<f64>::try_from(&t).unwrap());
        }
        seen
    });
    for seen in results {
        for (root, got) in seen.iter().enumerate() {
            assert!(got.iter().all(|&v| v == root as f64), "root {root}");
        }
    }
}

#[test]
fn barrier_returns_only_after_every_rank_entered() {
    let world = 4;
    let arrived = AtomicUsize::new(0);
    let results = run_ranks(world, 4096, |rank, mut ring| {
        let mut counts = Vec::new();
        for round in 1..=3 {
            // Later ranks arrive later; nobody may leave before the last one arrived.
            for _ in 0..rank * 1000 {
                std::hint::spin_loop();
            }
            std::thread::yield_now();
            arrived.fetch_add(1, Ordering::SeqCst);
            ring.barrier().unwrap();
            counts.push((round, arrived.load(Ordering::SeqCst)));
            ring.barrier().unwrap(); // keep rounds apart
        }
        counts
    });
    for counts in results {
        for (round, seen) in counts {
            assert!(
                seen >= round * world,
                "left round {round} having seen {seen} arrivals"
            );
        }
    }
}

#[test]
fn bucketer_round_trip_matches_per_tensor_sums() {
    let world = 3;
    let shapes: [&[i64]; 6] = [&[10, 10], &[7], &[300], &[2, 3, 4], &[1], &[500]];
    let make = |rank: usize| -> Vec<Tensor> {
        let mut ts: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let n: i64 = s.iter().product();
                (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * (k as f64 + 1.0)
                    + rank as f64)
                    .view(*s)
            })
            .collect();
        ts[3] = ts[3].to_kind(Kind::Double); // a dtype change starts a new bucket
        ts
    };
    let results = run_ranks(world, 4096, |rank, mut ring| {
        let mut ts = make(rank);
        // 1 KiB buckets: several buckets, and the 500-element tensor alone in its own (bigger than the limit).
        let mut b = Bucketer::new(&ts, 1024).unwrap();
        let layout = b.layout();
        b.all_reduce(&mut ring, &mut ts, ReduceOp::Sum).unwrap();
        // Second step reuses the flat buffers.
        let mut again = make(rank);
        b.all_reduce(&mut ring, &mut again, ReduceOp::Mean).unwrap();
        (layout, ts, again)
    });
    let inputs: Vec<Vec<Tensor>> = (0..world).map(make).collect();
    for (layout, ts, again) in results {
        assert_eq!(layout, vec![vec![0, 1], vec![2], vec![3], vec![4], vec![5]]);
        for (k, t) in ts.iter().enumerate() {
            let want = inputs
                .iter()
                .map(|x| x[k].shallow_clone())
                .reduce(|a, b| a + b)
                .unwrap();
            assert_eq!(t.size(), want.size());
            assert_eq!(t.kind(), want.kind());
            assert!(t.equal(&want), "tensor {k}");
            assert!(
                again[k].allclose(&(want / world as f64), 1e-6, 1e-6, false),
                "mean of tensor {k}"
            );
        }
    }
    // World 1 is the identity, and a changed tensor list is a typed error.
    let ts = make(0);
    let mut b = Bucketer::with_mib(&ts, 25).unwrap();
    assert_eq!(b.len(), 3, "f32 run, f64, f32 run");
    let mut single = RingTcp::connect(0, 1, &[loopback()], TIMEOUT).unwrap();
    let mut out: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    b.all_reduce(&mut single, &mut out, ReduceOp::Sum).unwrap();
    assert!(out.iter().zip(&ts).all(|(a, b)| a.equal(b)));
    let err = b
        .all_reduce(&mut single, &mut out[..2], ReduceOp::Sum)
        .unwrap_err();
    assert!(matches!(err, CollectiveError::Bucket(_)), "{err}");
}

#[test]
fn ordered_buckets_follow_the_order_and_reduce_one_at_a_time() {
    let world = 2;
    let make = |rank: usize| -> Vec<Tensor> {
        (0..5)
            .map(|k| {
                Tensor::full(
                    [100],
                    (k * 10 + rank) as f64,
                    (Kind::Float, tch::Device::Cpu),
                )
            })
            .collect()
    };
    let order = [4, 3, 1, 2, 0];
    let results = run_ranks(world, 4096, |rank, mut ring| {
        let mut ts = make(rank);
        // 800 bytes: two 100-element f32 tensors a bucket.
        let mut b = Bucketer::with_order(&ts, &order, 800).unwrap();
        let layout = b.layout();
        // Reduce bucket by bucket, checking that only the reduced buckets' tensors changed.
        let mut changed = Vec::new();
        for (k, members) in layout.iter().enumerate() {
            b.reduce_bucket(k, &mut ring, &mut ts, ReduceOp::Sum)
                .unwrap();
            changed.extend(members.iter().copied());
            for (i, t) in ts.iter().enumerate() {
                let want = if changed.contains(&i) {
                    (i * 20 + 1) as f64
                } else {
                    (i * 10 + rank) as f64
                };
                assert_eq!(t.double_value(&[0]), want, "tensor {i} after bucket {k}");
            }
        }
        layout
    });
    for layout in results {
        assert_eq!(layout, vec![vec![4, 3], vec![1, 2], vec![0]]);
    }
    let ts = make(0);
    for bad in [&[0, 1, 2, 3][..], &[0, 1, 2, 3, 3], &[0, 1, 2, 3, 5]] {
        let err = Bucketer::with_order(&ts, bad, 800).unwrap_err();
        assert!(matches!(err, CollectiveError::Bucket(_)), "{err}");
    }
    let mut b = Bucketer::with_order(&ts, &order, 800).unwrap();
    let mut single = RingTcp::connect(0, 1, &[loopback()], TIMEOUT).unwrap();
    let mut out: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    let err = b
        .reduce_bucket(3, &mut single, &mut out, ReduceOp::Sum)
        .unwrap_err();
    assert!(err.to_string().contains("no bucket 3"), "{err}");
}

#[test]
fn invalid_arguments_are_typed_errors() {
    let a = [loopback(), loopback()];
    assert!(matches!(
        RingTcp::connect(0, 0, &[], TIMEOUT),
        Err(CollectiveError::InvalidWorld { world: 0 })
    ));
    assert!(matches!(
        RingTcp::connect(2, 2, &a, TIMEOUT),
        Err(CollectiveError::InvalidRank { rank: 2, world: 2 })
    ));
    assert!(matches!(
        RingTcp::connect(0, 3, &a, TIMEOUT),
        Err(CollectiveError::AddressCount { given: 2, world: 3 })
    ));
    let mut single = RingTcp::connect(0, 1, &[loopback()], TIMEOUT).unwrap();
    let mut t = Tensor::from_slice(&[1.0f32]);
    assert!(matches!(
        single.broadcast(&mut t, 1),
        Err(CollectiveError::InvalidRoot { root: 1, world: 1 })
    ));
    let mut ints = Tensor::from_slice(&[1i64, 2]);
    let err = single.all_reduce(&mut ints, ReduceOp::Sum).unwrap_err();
    assert!(
        matches!(err, CollectiveError::UnsupportedTensor { rank: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Int64"), "{err}");
}

#[test]
fn rendezvous_with_a_missing_peer_times_out_naming_it() {
    let l = RingListener::bind(loopback()).unwrap();
    // A port nobody listens on: bind and drop.
    let gone = RingListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    let addrs = [l.local_addr().unwrap(), gone];
    let err = l
        .join(0, 2, &addrs, Duration::from_millis(500))
        .unwrap_err();
    assert!(
        matches!(
            err,
            CollectiveError::RendezvousTimeout {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn mismatched_calls_are_detected_not_exchanged() {
    let results = run_ranks(2, 4096, |rank, mut ring| {
        let mut t = Tensor::zeros([10 + rank as i64], (Kind::Float, tch::Device::Cpu));
        let first = ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
        // The communicator is poisoned afterwards.
        let second = ring.barrier().unwrap_err();
        (first, second)
    });
    let mut mismatches = 0;
    for (rank, (first, second)) in results.into_iter().enumerate() {
        match first {
            CollectiveError::Mismatch {
                rank: r,
                peer,
                ref ours,
                ref theirs,
            } => {
                assert_eq!((r, peer), (rank, 1 - rank));
                assert!(ours.contains(&format!("of {} F32", 10 + rank)), "{ours}");
                assert!(
                    theirs.contains(&format!("of {} F32", 11 - rank)),
                    "{theirs}"
                );
                mismatches += 1;
            }
            // The other rank may see the first one's shutdown before it reads the header.
            CollectiveError::PeerClosed { .. } => {}
            e => panic!("rank {rank}: {e}"),
        }
        assert!(
            matches!(second, CollectiveError::Poisoned { .. }),
            "{second}"
        );
    }
    assert!(mismatches >= 1, "the size mismatch was not reported");
}

#[test]
fn silent_peer_gives_timeout_naming_it() {
    let timeout = Duration::from_millis(700);
    let world = 3;
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind(loopback()).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for (rank, l) in listeners.into_iter().enumerate() {
            let (addrs, tx) = (&addrs, tx.clone());
            s.spawn(move || {
                let mut ring = l.join(rank, world, addrs, timeout).unwrap();
                if rank == 2 {
                    // Joined, then silent: holds its sockets open but never calls the collective.
                    let _ = tx.send((rank, None));
                    std::thread::sleep(timeout * 4);
                    return;
                }
                let mut t = Tensor::ones([100_000], (Kind::Float, tch::Device::Cpu));
                let _ = tx.send((
                    rank,
                    Some(ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()),
                ));
            });
        }
        drop(tx);
        let mut errors = Vec::new();
        while errors.len() < 3 {
            // A hang would stop here: the watchdog is a multiple of the configured timeout.
            let (rank, e) = rx
                .recv_timeout(timeout * 3)
                .expect("a rank hung instead of failing");
            errors.push((rank, e));
        }
        for (rank, e) in errors {
            match (rank, e) {
                (0, Some(e)) => {
                    assert!(
                        matches!(
                            e,
                            CollectiveError::Timeout {
                                rank: 0,
                                peer: 2,
                                ..
                            }
                        ),
                        "rank 0: {e}"
                    );
                    assert!(e.to_string().contains("peer rank 2"), "{e}");
                }
                (1, Some(e)) => assert!(
                    matches!(
                        e,
                        CollectiveError::Timeout { .. }
                            | CollectiveError::PeerClosed { rank: 1, .. }
                    ),
                    "rank 1: {e}"
                ),
                (2, None) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    });
}

const CHILD_ENV: &str = "M3D_COLLECTIVES_CHILD";

/// Rank 2 as a real process: joins the ring and all-reduces until it is killed.
fn child(spec: &str) {
    let addrs: Vec<SocketAddr> = spec.split(',').map(|a| a.parse().unwrap()).collect();
    let l = RingListener::bind(loopback()).unwrap();
    println!("PORT {}", l.local_addr().unwrap().port());
    let mut full = addrs.clone();
    full.push(l.local_addr().unwrap());
    let mut ring = l.join(2, 3, &full, TIMEOUT).unwrap();
    let mut t = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
    loop {
        ring.all_reduce(&mut t, ReduceOp::Mean).unwrap();
    }
}

#[test]
fn peer_process_killed_mid_operation_gives_errors_not_hangs() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    use std::io::BufRead;
    let timeout = Duration::from_secs(5);
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind(loopback()).unwrap())
        .collect();
    let mut addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let spec = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut proc = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "peer_process_killed_mid_operation_gives_errors_not_hangs",
            "--nocapture",
        ])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(proc.stdout.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines
            .next()
            .expect("child exited before listening")
            .unwrap();
        if let Some(p) = line.strip_prefix("PORT ") {
            break p.trim().parse().unwrap();
        }
    };
    addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    let done = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for (rank, l) in listeners.into_iter().enumerate() {
            let (addrs, tx, done) = (&addrs, tx.clone(), &done);
            s.spawn(move || {
                let mut ring = l.join(rank, 3, addrs, timeout).unwrap();
                let mut t = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
                let err = loop {
                    match ring.all_reduce(&mut t, ReduceOp::Mean) {
                        Ok(()) => {
                            assert_eq!(
                                Vec::<f32>::try_from(&t.get(12345).view([1])).unwrap(),
                                vec![1.0]
                            );
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => break e,
                    }
                };
                let _ = tx.send((rank, err));
            });
        }
        drop(tx);
        // Let every rank complete a few operations, then SIGKILL the child while they run the next ones.
        while done.load(Ordering::SeqCst) < 6 {
            std::thread::sleep(Duration::from_millis(5));
        }
        proc.kill().unwrap();
        let _ = proc.wait();
        for _ in 0..2 {
            let (rank, e) = rx
                .recv_timeout(timeout * 3)
                .expect("a rank hung after its peer was killed");
            // Rank 0 reads from the killed rank 2, rank 1 writes to it (or sees rank 0 shut down).
            assert!(
                matches!(
                    e,
                    CollectiveError::PeerClosed { .. } | CollectiveError::Timeout { .. }
                ),
                "rank {rank}: {e}"
            );
            if rank == 0 {
                assert!(
                    e.to_string().contains("peer rank 2"),
                    "rank 0 names the killed rank: {e}"
                );
            }
        }
    });
}

#[test]
fn a_stranger_or_a_rank_of_another_world_is_refused_at_rendezvous() {
    use std::io::Write;
    // hello = magic "M3DC" (little-endian), version 1, kind 0 (hello), pad, rank, world
    let hello = |rank: u32, world: u32| {
        let mut b = vec![0x43, 0x44, 0x33, 0x4d, 1, 0, 0, 0];
        b.extend(rank.to_le_bytes());
        b.extend(world.to_le_bytes());
        b
    };
    let cases: [(Vec<u8>, &str); 3] = [
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "bad magic"),
        (hello(1, 3), "expected rank 1 of world 2"),
        (hello(0, 2), "expected rank 1 of world 2"),
    ];
    for (bytes, want) in cases {
        let l = RingListener::bind(loopback()).unwrap();
        // The successor: a plain socket that accepts the connection in its backlog and says nothing.
        let succ = std::net::TcpListener::bind(loopback()).unwrap();
        let addrs = [l.local_addr().unwrap(), succ.local_addr().unwrap()];
        let target = addrs[0];
        let stranger = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(target).unwrap();
            s.write_all(&bytes).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let err = l.join(0, 2, &addrs, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, CollectiveError::Handshake { rank: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(want), "{err}");
        stranger.join().unwrap();
    }
}
