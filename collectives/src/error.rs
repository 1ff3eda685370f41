//! Typed errors: every one names the rank that saw it and, where a peer is involved, the peer's rank.

use std::time::Duration;

/// An error of a collective operation or of setting up a communicator.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid world size {world}: it must be at least 1")]
    InvalidWorld { world: usize },
    #[error("rank {rank} is out of range for world size {world}")]
    InvalidRank { rank: usize, world: usize },
    #[error("root rank {root} is out of range for world size {world}")]
    InvalidRoot { root: usize, world: usize },
    #[error(
        "{given} peer addresses given for world size {world}: there must be exactly one per rank"
    )]
    AddressCount { given: usize, world: usize },
    #[error("rank {rank}: cannot listen on {addr}: {source}")]
    Bind {
        rank: usize,
        addr: String,
        source: std::io::Error,
    },
    #[error("rank {rank}: rendezvous with rank {peer} at {addr} did not complete within {timeout:?}{detail}")]
    RendezvousTimeout {
        rank: usize,
        peer: usize,
        addr: String,
        timeout: Duration,
        detail: String,
    },
    #[error("rank {rank}: invalid handshake from {addr}: {detail}")]
    Handshake {
        rank: usize,
        addr: String,
        detail: String,
    },
    #[error("rank {rank}: peer rank {peer} sent nothing for {timeout:?} during {op}")]
    Timeout {
        rank: usize,
        peer: usize,
        op: &'static str,
        timeout: Duration,
    },
    #[error("rank {rank}: peer rank {peer} closed the connection during {op}")]
    PeerClosed {
        rank: usize,
        peer: usize,
        op: &'static str,
    },
    #[error("rank {rank}: connection with peer rank {peer} failed during {op}: {source}")]
    PeerIo {
        rank: usize,
        peer: usize,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "rank {rank} is in {ours} but its predecessor rank {peer} is in {theirs}: every rank must call the same \
         collectives in the same order with the same dtype, size and root"
    )]
    Mismatch {
        rank: usize,
        peer: usize,
        ours: String,
        theirs: String,
    },
    #[error("rank {rank}: unsupported tensor for {op}: {detail}")]
    UnsupportedTensor {
        rank: usize,
        op: &'static str,
        detail: String,
    },
    #[error(
        "rank {rank}: {op} did not complete within {timeout:?}{detail}; the communicator was aborted (a peer is \
         dead, stuck or never joined)"
    )]
    OpTimeout {
        rank: usize,
        op: &'static str,
        timeout: Duration,
        detail: String,
    },
    #[error("rank {rank}: {op} was aborted: {reason}")]
    Aborted {
        rank: usize,
        op: &'static str,
        reason: String,
    },
    #[error("rank {rank}: this communicator failed earlier ({cause}); create a new one")]
    Poisoned { rank: usize, cause: String },
    #[error("bucketer: {0}")]
    Bucket(String),
    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),
    #[error("rank {rank}: {call} failed: {detail}")]
    Nccl {
        rank: usize,
        call: &'static str,
        detail: String,
    },
    #[error("rank {rank}: libtorch error during {op}: {source}")]
    Torch {
        rank: usize,
        op: &'static str,
        source: tch::TchError,
    },
}
