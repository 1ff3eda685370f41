//! `RingTcp`: ring collectives over TCP between processes.
//!
//! Every rank holds two connections: one to its successor (`rank + 1`), on which it only writes, and one from its
//! predecessor, from which it only reads. All-reduce is the bandwidth-optimal ring: a reduce-scatter of `world - 1`
//! steps followed by an all-gather of `world - 1` steps, each rank sending `2 (n - 1) / n` of the buffer. Segments are
//! cut into chunks and pipelined: a sender thread writes chunk `k` of step `s + 1` while the calling thread is
//! still receiving chunk `k + 1` of step `s`. Chunks travel between the two threads as `&mut [T]` through channels,
//! so there is no shared mutable state, no copy of the user's buffer and no per-element allocation.
//!
//! Determinism: segment `c` starts on rank `c` and every rank on its way adds its own value to the incoming partial
//! sum, so each element is reduced in one fixed order (which depends only on the world size) on exactly one rank,
//! then copied verbatim to the others. Every rank therefore ends with identical bits.
//!
//! Failure: sockets carry read and write timeouts; any error poisons the communicator and shuts both sockets down,
//! so the failure propagates around the ring at once instead of each rank waiting for its own timeout. The
//! rendezvous (connecting to the successor, accepting the predecessor) is polled by the crate's watchdog under one
//! deadline, as NCCL's setup and operations are.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tch::Tensor;

use crate::element::{DType, Element};
use crate::error::CollectiveError;
use crate::raw;
use crate::watchdog::{FnWatched, Status, WaitError, Watchdog};
use crate::{finish_reduce, Collective, ReduceOp, Result};

/// Bytes per pipelined chunk: large enough that a syscall moves a lot, small enough to overlap sends and receives.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 10;
/// Socket send/receive buffers: a few chunks in flight, so a sender rarely waits for its receiver, yet the bytes in
/// flight stay in the CPU caches. Measured on loopback (bench/allreduce.py, 4 ranks, 64 MiB): 8 MiB buffers with
/// 1 MiB chunks reached ~0.55 GB/s bus bandwidth, 2 MiB buffers with 256 KiB chunks ~0.9 GB/s.
const SOCKET_BUFFER_BYTES: usize = 2 << 20;
const MAGIC: u32 = 0x4d33_4443; // "M3DC"
const VERSION: u8 = 1;
const HELLO_BYTES: usize = 16;
const HEADER_BYTES: usize = 32;

const OP_ALL_REDUCE: u8 = 1;
const OP_ALL_GATHER: u8 = 2;
const OP_BROADCAST: u8 = 3;
const OP_BARRIER: u8 = 4;

fn op_name(op: u8) -> &'static str {
    match op {
        OP_ALL_REDUCE => "all_reduce",
        OP_ALL_GATHER => "all_gather",
        OP_BROADCAST => "broadcast",
        OP_BARRIER => "barrier",
        _ => "unknown operation",
    }
}

fn validate(rank: usize, world: usize, peers: usize) -> Result<()> {
    if world == 0 {
        return Err(CollectiveError::InvalidWorld { world });
    }
    if rank >= world {
        return Err(CollectiveError::InvalidRank { rank, world });
    }
    if peers != world {
        return Err(CollectiveError::AddressCount {
            given: peers,
            world,
        });
    }
    Ok(())
}

/// Maps a socket error to a typed error naming the peer.
fn io_error(
    rank: usize,
    peer: usize,
    op: &'static str,
    timeout: Duration,
    e: std::io::Error,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            rank,
            peer,
            op,
            timeout,
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::NotConnected => CollectiveError::PeerClosed { rank, peer, op },
        _ => CollectiveError::PeerIo {
            rank,
            peer,
            op,
            source: e,
        },
    }
}

fn tune(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    Ok(())
}

fn hello(kind: u8, rank: usize, world: usize) -> [u8; HELLO_BYTES] {
    let mut b = [0u8; HELLO_BYTES];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = VERSION;
    b[5] = kind;
    b[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    b[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    b
}

/// Parses a hello or ack; returns the sender's (rank, world) or what is wrong with it.
fn parse_hello(b: &[u8; HELLO_BYTES], kind: u8) -> std::result::Result<(usize, usize), String> {
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if word(0) != MAGIC {
        return Err("not an m3d collectives peer (bad magic)".into());
    }
    if b[4] != VERSION {
        return Err(format!(
            "protocol version {} (this rank speaks {VERSION})",
            b[4]
        ));
    }
    if b[5] != kind {
        return Err(format!("message kind {} where {kind} was expected", b[5]));
    }
    Ok((word(8) as usize, word(12) as usize))
}

/// A bound listening socket, before the ring is formed.
///
/// Binding first and joining later lets a worker listen on port 0, report the real address to the coordinator and
/// join once it knows every peer's address.
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds `addr` (port 0 picks a free port) with large receive buffers (inherited by the accepted connection,
    /// so the TCP window can scale from the first byte).
    pub fn bind(addr: SocketAddr) -> std::io::Result<RingListener> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
        sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
        sock.bind(&addr.into())?;
        sock.listen(128)?;
        Ok(RingListener {
            listener: sock.into(),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Forms the ring: connects to the successor `peers[(rank + 1) % world]` (retrying until it listens), accepts
    /// the predecessor and checks both handshakes. Fails with a typed error naming the peer if this does not
    /// complete within `timeout`, which is also the timeout of every later operation.
    pub fn join(
        self,
        rank: usize,
        world: usize,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<RingTcp> {
        validate(rank, world, peers.len())?;
        if world == 1 {
            return Ok(RingTcp::single(timeout));
        }
        // One deadline for the whole rendezvous (connect, accept, handshakes).
        let dog = Watchdog::new("rendezvous", timeout);
        let succ = (rank + 1) % world;
        let pred = (rank + world - 1) % world;
        let remaining = || dog.remaining().max(Duration::from_millis(1));

        // Connect to the successor; it may not listen yet, so retry until the deadline.
        let succ_addr = peers[succ];
        let rendezvous_timeout =
            |peer: usize, addr: SocketAddr, detail: String| CollectiveError::RendezvousTimeout {
                rank,
                peer,
                addr: addr.to_string(),
                timeout,
                detail,
            };
        let mut last_attempt = None;
        let mut connect = FnWatched {
            poll: || {
                let attempt = Socket::new(
                    Domain::for_address(succ_addr),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )
                .and_then(|s| {
                    s.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
                    s.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
                    s.connect_timeout(&succ_addr.into(), remaining().min(Duration::from_secs(1)))?;
                    Ok(TcpStream::from(s))
                });
                match attempt {
                    Ok(s) => Status::<_, std::convert::Infallible>::Done(s),
                    Err(e) => {
                        last_attempt = Some(e);
                        Status::Pending
                    }
                }
            },
            abort: || {},
        };
        let connected = dog
            .clone()
            .sleeps(Duration::from_millis(20), Duration::from_millis(20))
            .wait(&mut connect);
        let mut next = match connected {
            Ok(s) => s,
            Err(_) => {
                let detail =
                    last_attempt.map_or_else(String::new, |e| format!(" (last attempt: {e})"));
                return Err(rendezvous_timeout(succ, succ_addr, detail));
            }
        };
        let op = "rendezvous";
        let io = |peer: usize, e: std::io::Error| io_error(rank, peer, op, timeout, e);
        tune(&next, remaining()).map_err(|e| io(succ, e))?;
        next.write_all(&hello(0, rank, world))
            .map_err(|e| io(succ, e))?;

        // Accept the predecessor (non-blocking accept, so the deadline holds).
        self.listener
            .set_nonblocking(true)
            .map_err(|e| io(pred, e))?;
        let mut accept = FnWatched {
            poll: || match self.listener.accept() {
                Ok(pair) => Status::Done(pair),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Status::Pending,
                Err(e) => Status::Failed(e),
            },
            abort: || {},
        };
        let accepted = dog
            .clone()
            .sleeps(Duration::from_millis(5), Duration::from_millis(5))
            .wait(&mut accept);
        let (mut prev, from) = match accepted {
            Ok(pair) => pair,
            Err(WaitError::Failed(e)) => return Err(io(pred, e)),
            Err(_) => {
                return Err(rendezvous_timeout(
                    pred,
                    peers[pred],
                    " (it never connected)".into(),
                ))
            }
        };
        prev.set_nonblocking(false).map_err(|e| io(pred, e))?;
        tune(&prev, remaining()).map_err(|e| io(pred, e))?;
        let mut buf = [0u8; HELLO_BYTES];
        prev.read_exact(&mut buf).map_err(|e| io(pred, e))?;
        let handshake = |detail: String| CollectiveError::Handshake {
            rank,
            addr: from.to_string(),
            detail,
        };
        let (their_rank, their_world) = parse_hello(&buf, 0).map_err(handshake)?;
        if their_world != world || their_rank != pred {
            return Err(handshake(format!(
                "it is rank {their_rank} of world {their_world}; expected rank {pred} of world {world}"
            )));
        }
        prev.write_all(&hello(1, rank, world))
            .map_err(|e| io(pred, e))?;

        // The successor's acknowledgement: it accepted us as its predecessor.
        next.read_exact(&mut buf).map_err(|e| io(succ, e))?;
        let (their_rank, their_world) =
            parse_hello(&buf, 1).map_err(|detail| CollectiveError::Handshake {
                rank,
                addr: succ_addr.to_string(),
                detail,
            })?;
        if their_world != world || their_rank != succ {
            return Err(CollectiveError::Handshake {
                rank,
                addr: succ_addr.to_string(),
                detail: format!("it is rank {their_rank} of world {their_world}; expected rank {succ} of world {world}"),
            });
        }
        tune(&next, timeout).map_err(|e| io(succ, e))?;
        tune(&prev, timeout).map_err(|e| io(pred, e))?;
        let next_ctl = next.try_clone().map_err(|e| io(succ, e))?;
        let prev_ctl = prev.try_clone().map_err(|e| io(pred, e))?;
        tracing::debug!(rank, world, "ring formed");
        Ok(RingTcp {
            rank,
            world,
            timeout,
            links: Some(Links {
                next,
                prev,
                next_ctl,
                prev_ctl,
            }),
            seq: 0,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            scratch: Vec::new(),
            poisoned: None,
        })
    }
}

struct Links {
    next: TcpStream,
    prev: TcpStream,
    /// Clones used only to shut the sockets down from the other thread when an operation fails.
    next_ctl: TcpStream,
    prev_ctl: TcpStream,
}

/// How a received chunk is combined with the local one.
#[derive(Clone, Copy)]
enum Mode {
    Reduce,
    Copy,
}

/// One receive of a plan: which chunk, how, and whether it is sent on to the successor afterwards.
struct Step {
    chunk: usize,
    mode: Mode,
    forward: bool,
}

/// A ring communicator over TCP. See the module docs.
pub struct RingTcp {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Option<Links>,
    seq: u64,
    chunk_bytes: usize,
    /// Receive buffer for one chunk of a reduction, kept between operations (u64 for alignment of any element).
    scratch: Vec<u64>,
    poisoned: Option<String>,
}

impl std::fmt::Debug for RingTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingTcp")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish_non_exhaustive()
    }
}

impl RingTcp {
    fn single(timeout: Duration) -> RingTcp {
        RingTcp {
            rank: 0,
            world: 1,
            timeout,
            links: None,
            seq: 0,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            scratch: Vec::new(),
            poisoned: None,
        }
    }

    /// Rendezvous: listens on `peers[rank]`, connects to the successor and accepts the predecessor (see
    /// [`RingListener::join`]). With `world == 1` nothing is opened and every operation is the identity.
    pub fn connect(
        rank: usize,
        world: usize,
        peers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<RingTcp> {
        validate(rank, world, peers.len())?;
        if world == 1 {
            return Ok(RingTcp::single(timeout));
        }
        let listener = RingListener::bind(peers[rank]).map_err(|source| CollectiveError::Bind {
            rank,
            addr: peers[rank].to_string(),
            source,
        })?;
        listener.join(rank, world, peers, timeout)
    }

    /// Sets the pipelining chunk size in bytes (default [`DEFAULT_CHUNK_BYTES`]); it need not match across ranks.
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.chunk_bytes = bytes.max(64);
    }

    /// The timeout of every socket read and write (also the rendezvous timeout).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(CollectiveError::Poisoned {
                rank: self.rank,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        if let Some(l) = &self.links {
            let _ = l.next_ctl.shutdown(Shutdown::Both);
            let _ = l.prev_ctl.shutdown(Shutdown::Both);
        }
        tracing::warn!(rank = self.rank, error = %e, "collective failed; communicator poisoned");
        self.poisoned = Some(e.to_string());
        e
    }

    fn pred(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn succ(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// Sends this operation's header to the successor and checks the predecessor's against it.
    fn exchange_header(&mut self, op: u8, dtype: DType, root: usize, len: usize) -> Result<()> {
        self.seq += 1;
        let (rank, pred, succ, timeout, seq) =
            (self.rank, self.pred(), self.succ(), self.timeout, self.seq);
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = op;
        h[5] = dtype as u8;
        h[8..12].copy_from_slice(&(root as u32).to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        h[24..32].copy_from_slice(&(len as u64).to_le_bytes());
        let name = op_name(op);
        let result = links
            .next
            .write_all(&h)
            .map_err(|e| io_error(rank, succ, name, timeout, e))
            .and_then(|()| {
                let mut theirs = [0u8; HEADER_BYTES];
                links
                    .prev
                    .read_exact(&mut theirs)
                    .map_err(|e| io_error(rank, pred, name, timeout, e))?;
                if theirs == h {
                    return Ok(());
                }
                let describe = |b: &[u8; HEADER_BYTES]| {
                    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if magic != MAGIC {
                        return "a corrupted stream (bad header magic)".to_string();
                    }
                    let root = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
                    let mut seq = [0u8; 8];
                    seq.copy_from_slice(&b[16..24]);
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&b[24..32]);
                    let dtype = DType::from_u8(b[5])
                        .map_or_else(|| format!("dtype {}", b[5]), |d| format!("{d:?}"));
                    let root = if b[4] == OP_BROADCAST {
                        format!(" from root {root}")
                    } else {
                        String::new()
                    };
                    format!(
                        "operation #{} {} of {} {dtype} elements{root}",
                        u64::from_le_bytes(seq),
                        op_name(b[4]),
                        u64::from_le_bytes(len)
                    )
                };
                Err(CollectiveError::Mismatch {
                    rank,
                    peer: pred,
                    ours: describe(&h),
                    theirs: describe(&theirs),
                })
            });
        result.map_err(|e| self.fail(e))
    }

    /// Runs a plan: `first` are chunks sent before anything is received; then each step receives one chunk (adding
    /// or copying it) and, if `forward`, hands it to the sender thread for the successor.
    fn run<T: Element>(
        &mut self,
        op: &'static str,
        slots: Vec<&mut [T]>,
        first: &[usize],
        steps: &[Step],
    ) -> Result<()> {
        let (rank, pred, succ, timeout) = (self.rank, self.pred(), self.succ(), self.timeout);
        let chunk_elems = (self.chunk_bytes / std::mem::size_of::<T>()).max(1);
        let need = (chunk_elems * std::mem::size_of::<T>()).div_ceil(8);
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let scratch: &mut [T] =
            &mut bytemuck::cast_slice_mut::<u64, T>(&mut self.scratch)[..chunk_elems];
        let Links {
            next,
            prev,
            next_ctl,
            prev_ctl,
        } = links;
        // Who failed first (1: receiving thread, 2: sending thread): the other one's error is only the echo of the
        // sockets being shut down.
        let first_failure = AtomicU8::new(0);
        let mut slots: Vec<Option<&mut [T]>> = slots.into_iter().map(Some).collect();

        let (send_result, recv_result) = std::thread::scope(|s| {
            let (to_send, send_rx) = mpsc::channel::<(usize, &mut [T])>();
            let (ret_tx, returned) = mpsc::channel::<(usize, &mut [T])>();
            let first_failure = &first_failure;
            let prev_ctl = &*prev_ctl;
            let sender = s.spawn(move || -> Result<()> {
                for (id, chunk) in send_rx {
                    if let Err(e) = next.write_all(bytemuck::cast_slice(chunk)) {
                        let _ = first_failure.compare_exchange(
                            0,
                            2,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        // Unblock the receiving thread at once.
                        let _ = prev_ctl.shutdown(Shutdown::Both);
                        return Err(io_error(rank, succ, op, timeout, e));
                    }
                    if ret_tx.send((id, chunk)).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let recv_result = (|| -> Result<()> {
                let sender_gone = || CollectiveError::PeerClosed {
                    rank,
                    peer: succ,
                    op,
                };
                for &id in first {
                    let chunk = slots[id].take().ok_or_else(sender_gone)?;
                    to_send.send((id, chunk)).map_err(|_| sender_gone())?;
                }
                for step in steps {
                    let chunk = match slots[step.chunk].take() {
                        Some(c) => c,
                        // Still with the sender: wait for it to come back (it was queued earlier, so it will).
                        None => loop {
                            let (id, c) = returned.recv().map_err(|_| sender_gone())?;
                            if id == step.chunk {
                                break c;
                            }
                            slots[id] = Some(c);
                        },
                    };
                    let read = match step.mode {
                        Mode::Copy => prev.read_exact(bytemuck::cast_slice_mut(chunk)),
                        Mode::Reduce => {
                            let incoming = &mut scratch[..chunk.len()];
                            let r = prev.read_exact(bytemuck::cast_slice_mut(incoming));
                            if r.is_ok() {
                                T::add_into(chunk, incoming);
                            }
                            r
                        }
                    };
                    read.map_err(|e| io_error(rank, pred, op, timeout, e))?;
                    if step.forward {
                        to_send
                            .send((step.chunk, chunk))
                            .map_err(|_| sender_gone())?;
                    }
                }
                Ok(())
            })();
            if recv_result.is_err() {
                let _ = first_failure.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
                let _ = next_ctl.shutdown(Shutdown::Both);
            }
            drop(to_send);
            let send_result = sender.join().unwrap_or_else(|_| {
                Err(CollectiveError::PeerIo {
                    rank,
                    peer: succ,
                    op,
                    source: std::io::Error::other("sender thread panicked"),
                })
            });
            (send_result, recv_result)
        });
        let err = match (send_result, recv_result) {
            (Ok(()), Ok(())) => return Ok(()),
            (Err(s), Err(r)) => {
                if first_failure.load(Ordering::SeqCst) == 2 {
                    s
                } else {
                    r
                }
            }
            (Err(e), Ok(())) | (Ok(()), Err(e)) => e,
        };
        Err(self.fail(err))
    }

    /// Splits `data` into `parts` nearly equal consecutive parts (sizes differ by at most one; some may be empty),
    /// each cut into chunks; returns the chunks and each part's range of chunk ids.
    fn split<'a, T: Element>(
        &self,
        data: &'a mut [T],
        parts: usize,
    ) -> (Vec<&'a mut [T]>, Vec<std::ops::Range<usize>>) {
        let chunk_elems = (self.chunk_bytes / std::mem::size_of::<T>()).max(1);
        let len = data.len();
        let mut chunks = Vec::new();
        let mut ranges = Vec::with_capacity(parts);
        let mut rest = data;
        for i in 0..parts {
            let size = (i + 1) * len / parts - i * len / parts;
            let (part, tail) = rest.split_at_mut(size);
            rest = tail;
            let start = chunks.len();
            chunks.extend(part.chunks_mut(chunk_elems));
            ranges.push(start..chunks.len());
        }
        (chunks, ranges)
    }

    /// Sums `data` over all ranks in place (ring reduce-scatter + all-gather).
    pub fn all_reduce_slice<T: Element>(&mut self, data: &mut [T]) -> Result<()> {
        self.check()?;
        if self.world == 1 {
            return Ok(());
        }
        self.exchange_header(OP_ALL_REDUCE, T::DTYPE, 0, data.len())?;
        let (n, r) = (self.world, self.rank);
        let (chunks, segs) = self.split(data, n);
        let seg = |k: usize| segs[k % n].clone();
        let first: Vec<usize> = seg(r).collect();
        let mut steps = Vec::with_capacity(2 * chunks.len());
        // Reduce-scatter: at step s receive segment r - s - 1, add, and pass it on; after n - 1 steps this rank
        // holds the complete sum of segment r + 1.
        for s in 0..n - 1 {
            steps.extend(seg(r + 2 * n - s - 1).map(|chunk| Step {
                chunk,
                mode: Mode::Reduce,
                forward: true,
            }));
        }
        // All-gather: at step s receive the finished segment r - s and pass it on, except at the last step.
        for s in 0..n - 1 {
            let forward = s + 2 < n;
            steps.extend(seg(r + n - s).map(|chunk| Step {
                chunk,
                mode: Mode::Copy,
                forward,
            }));
        }
        self.run("all_reduce", chunks, &first, &steps)
    }

    /// Gathers every rank's `input` into `out` (length `world * input.len()`) in rank order.
    pub fn all_gather_slice<T: Element>(&mut self, input: &[T], out: &mut [T]) -> Result<()> {
        self.gather(OP_ALL_GATHER, input, out)
    }

    fn gather<T: Element>(&mut self, op: u8, input: &[T], out: &mut [T]) -> Result<()> {
        self.check()?;
        let (n, r, len) = (self.world, self.rank, input.len());
        if out.len() != n * len {
            return Err(CollectiveError::UnsupportedTensor {
                rank: r,
                op: op_name(op),
                detail: format!("output holds {} elements, expected {n} x {len}", out.len()),
            });
        }
        out[r * len..(r + 1) * len].copy_from_slice(input);
        self.gather_filled(op, out, len)
    }

    /// All-gather where `out` (length `world * len`) already holds this rank's block at `rank * len`.
    fn gather_filled<T: Element>(&mut self, op: u8, out: &mut [T], len: usize) -> Result<()> {
        self.check()?;
        let (n, r) = (self.world, self.rank);
        if n == 1 {
            return Ok(());
        }
        self.exchange_header(op, T::DTYPE, 0, len)?;
        let (chunks, blocks) = self.split(out, n);
        let block = |k: usize| blocks[k % n].clone();
        let first: Vec<usize> = block(r).collect();
        let mut steps = Vec::new();
        for s in 0..n - 1 {
            let forward = s + 2 < n;
            steps.extend(block(r + 2 * n - s - 1).map(|chunk| Step {
                chunk,
                mode: Mode::Copy,
                forward,
            }));
        }
        self.run(op_name(op), chunks, &first, &steps)
    }

    /// Overwrites `data` on every rank with rank `root`'s (pipelined along the ring from the root).
    pub fn broadcast_slice<T: Element>(&mut self, data: &mut [T], root: usize) -> Result<()> {
        self.check()?;
        if root >= self.world {
            return Err(CollectiveError::InvalidRoot {
                root,
                world: self.world,
            });
        }
        if self.world == 1 {
            return Ok(());
        }
        self.exchange_header(OP_BROADCAST, T::DTYPE, root, data.len())?;
        let (chunks, _) = self.split(data, 1);
        let ids = 0..chunks.len();
        if self.rank == root {
            let first: Vec<usize> = ids.collect();
            self.run("broadcast", chunks, &first, &[])
        } else {
            let forward = self.succ() != root;
            let steps: Vec<Step> = ids
                .map(|chunk| Step {
                    chunk,
                    mode: Mode::Copy,
                    forward,
                })
                .collect();
            self.run("broadcast", chunks, &[], &steps)
        }
    }

    /// Returns once every rank has entered: a one-byte all-gather, in which each rank's byte must travel through
    /// every other rank.
    pub fn barrier_sync(&mut self) -> Result<()> {
        let mut out = vec![0u8; self.world];
        self.gather(OP_BARRIER, &[1u8], &mut out)
    }
}

/// Runs `f` on the tensor's elements as a slice of the matching Rust type.
macro_rules! dispatch {
    ($self:ident, $t:expr, $op:expr, |$s:ident| $body:expr) => {{
        let rank = $self.rank;
        let kind = $t.kind();
        match DType::of_kind(kind) {
            Some(DType::F32) => raw::with_cpu_slice_mut::<f32, _>($t, rank, $op, |$s| $body)?,
            Some(DType::F64) => raw::with_cpu_slice_mut::<f64, _>($t, rank, $op, |$s| $body)?,
            Some(DType::BF16) => {
                raw::with_cpu_slice_mut::<half::bf16, _>($t, rank, $op, |$s| $body)?
            }
            Some(DType::F16) => raw::with_cpu_slice_mut::<half::f16, _>($t, rank, $op, |$s| $body)?,
            Some(DType::U8) => raw::with_cpu_slice_mut::<u8, _>($t, rank, $op, |$s| $body)?,
            None => Err(CollectiveError::UnsupportedTensor {
                rank,
                op: $op,
                detail: format!("dtype {kind:?} (supported: f32, f64, bf16, f16, u8)"),
            }),
        }
    }};
}

fn torch(rank: usize, op: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
    move |source| CollectiveError::Torch { rank, op, source }
}

impl RingTcp {
    /// Runs `f` on a contiguous CPU tensor, through a contiguous copy if `t` is not contiguous.
    fn on_contiguous(
        &mut self,
        t: &mut Tensor,
        op: &'static str,
        f: impl FnOnce(&mut Self, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        raw::check_cpu(t, self.rank, op)?;
        if t.is_contiguous() {
            return f(self, t);
        }
        let mut c = t.f_contiguous().map_err(torch(self.rank, op))?;
        f(self, &mut c)?;
        t.f_copy_(&c).map_err(torch(self.rank, op))
    }
}

impl Collective for RingTcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.on_contiguous(tensor, "all_reduce", |me, t| {
            dispatch!(me, t, "all_reduce", |s| me.all_reduce_slice(s))
        })?;
        finish_reduce(tensor, op, self.world, self.rank)
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor> {
        let (rank, op) = (self.rank, "all_gather");
        raw::check_cpu(tensor, rank, op)?;
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        let mut one_shape = shape.clone();
        shape[0] *= self.world as i64;
        let mut out = Tensor::f_empty(shape.as_slice(), (tensor.kind(), tch::Device::Cpu))
            .map_err(torch(rank, op))?;
        // The own block is copied in by libtorch (any layout); the ring then fills the others in place.
        let d0 = one_shape[0];
        let mut mine = out
            .f_narrow(0, rank as i64 * d0, d0)
            .map_err(torch(rank, op))?;
        one_shape[0] = d0;
        mine.f_copy_(
            &tensor
                .f_reshape(one_shape.as_slice())
                .map_err(torch(rank, op))?,
        )
        .map_err(torch(rank, op))?;
        let len = tensor.numel();
        dispatch!(self, &mut out, op, |s| self.gather_filled(
            OP_ALL_GATHER,
            s,
            len
        ))?;
        Ok(out)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.on_contiguous(tensor, "broadcast", |me, t| {
            dispatch!(me, t, "broadcast", |s| me.broadcast_slice(s, root))
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.barrier_sync()
    }
}
