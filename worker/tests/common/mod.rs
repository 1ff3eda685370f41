//! The ranks of the worker's in-process data-parallel tests: one rank alone, or two ranks in two threads joined
//! by the TCP ring on loopback, and comparisons of named parameter lists.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use m3d_collectives::{Collective, RingListener, RingTcp};
use tch::Tensor;

/// Named tensors (parameters, gradients), sorted by name.
pub type Named = Vec<(String, Tensor)>;

/// The collective timeout of the tests' rings.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's world: the single-process ring.
pub fn one_rank<T>(f: impl FnOnce(&mut dyn Collective) -> T) -> T {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut comm = RingTcp::connect(0, 1, &[addr], TIMEOUT).unwrap();
    f(&mut comm)
}

/// Two ranks in two threads joined by the TCP ring; rank r gets `inputs[r]` (tensors are not `Sync`).
pub fn two_ranks<I: Send, T: Send>(
    inputs: [I; 2],
    f: impl Fn(&mut dyn Collective, I) -> T + Sync,
) -> Vec<T> {
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .zip(inputs)
            .enumerate()
            .map(|(rank, (l, input))| {
                let (addrs, f) = (&addrs, &f);
                s.spawn(move || {
                    let mut comm = l.join(rank, 2, addrs, TIMEOUT).unwrap();
                    f(&mut comm, input)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Largest absolute difference over all tensors (names must match).
pub fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((n, x), (m, y))| {
            assert_eq!(n, m);
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}
