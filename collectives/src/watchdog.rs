//! `Watchdog`: waits for an operation by polling its status, with a deadline and an abort.
//!
//! One decision, shared by both backends: poll the operation; done → return its result; failed → abort it and
//! return the error; still pending → check the [`AbortSignal`] (someone else gave up on the round: abort), then the
//! deadline (passed: abort, and an error naming the operation and the timeout), then wait a little and poll again.
//! The operation is aborted exactly once on every path that does not return a result, so whoever waits never
//! leaves a half-finished operation behind.
//!
//! - NCCL ([`crate::Nccl`]): the communicator is non-blocking; the status is `ncclCommGetAsyncError` (in progress,
//!   ok, or an error such as a peer's connection closing) together with a CUDA event recorded after the kernel; the
//!   abort is `ncclCommAbort`, which also stops kernels spinning on a dead peer.
//! - The TCP ring ([`crate::RingTcp`]): its rendezvous (connecting to the successor, accepting the predecessor)
//!   polls the sockets; nothing to abort there but the attempt. (Its operations rely on socket timeouts: a blocked
//!   `read` returns by itself.)
//!
//! The waiting is adaptive: a short phase of yielding (a GPU collective of a few MiB completes in tens of
//! microseconds, and sleeping would add more than that), then sleeps that double up to a ceiling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one poll of a pending operation found.
#[derive(Debug)]
pub(crate) enum Status<T, E> {
    Pending,
    Done(T),
    Failed(E),
}

/// An operation a [`Watchdog`] waits for.
pub(crate) trait Watched {
    type Output;
    type Error;

    /// The operation's state now, without blocking (or blocking briefly: a connect attempt).
    fn poll(&mut self) -> Status<Self::Output, Self::Error>;

    /// Gives up on the operation (NCCL: `ncclCommAbort`). Called at most once, when it failed, was cancelled or
    /// timed out; never after it completed.
    fn abort(&mut self);
}

/// A [`Watched`] made of two closures.
pub(crate) struct FnWatched<P, A> {
    pub(crate) poll: P,
    pub(crate) abort: A,
}

impl<T, E, P, A> Watched for FnWatched<P, A>
where
    P: FnMut() -> Status<T, E>,
    A: FnMut(),
{
    type Output = T;
    type Error = E;

    fn poll(&mut self) -> Status<T, E> {
        (self.poll)()
    }

    fn abort(&mut self) {
        (self.abort)()
    }
}

/// Why a wait ended without a result. The operation was aborted in every case.
#[derive(Debug)]
pub(crate) enum WaitError<E> {
    /// The operation reported an error.
    Failed(E),
    /// The deadline passed while it was still pending.
    TimedOut { op: &'static str, timeout: Duration },
    /// The [`AbortSignal`] was raised while it was pending.
    Cancelled { op: &'static str, reason: String },
}

/// A request, from any thread, to give up on whatever a communicator is waiting for — e.g. the coordinator has
/// ended the round, so a collective waiting for a dead peer need not wait for its timeout. Cheap to clone; all
/// clones share one flag. Raising it is permanent.
#[derive(Clone, Default)]
pub struct AbortSignal(Arc<AbortInner>);

#[derive(Default)]
struct AbortInner {
    raised: AtomicBool,
    reason: Mutex<String>,
}

impl std::fmt::Debug for AbortSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortSignal")
            .field("reason", &self.reason())
            .finish()
    }
}

impl AbortSignal {
    pub fn new() -> Self {
        AbortSignal::default()
    }

    /// Raises the signal; the first reason given is kept.
    pub fn abort(&self, reason: impl Into<String>) {
        let mut r = self
            .0
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.0.raised.swap(true, Ordering::SeqCst) {
            *r = reason.into();
        }
    }

    /// The reason, once raised.
    pub fn reason(&self) -> Option<String> {
        if !self.0.raised.load(Ordering::SeqCst) {
            return None;
        }
        Some(
            self.0
                .reason
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

/// Waits for [`Watched`] operations until a deadline fixed at creation (one watchdog can cover several waits that
/// share a budget, as the ring's connect and accept do).
#[derive(Debug, Clone)]
pub(crate) struct Watchdog {
    op: &'static str,
    timeout: Duration,
    deadline: Instant,
    signal: Option<AbortSignal>,
    spin: Duration,
    first_sleep: Duration,
    max_sleep: Duration,
}

impl Watchdog {
    /// A watchdog for `op` whose deadline is `timeout` from now.
    pub(crate) fn new(op: &'static str, timeout: Duration) -> Watchdog {
        Watchdog {
            op,
            timeout,
            deadline: Instant::now() + timeout,
            signal: None,
            spin: Duration::ZERO,
            first_sleep: Duration::from_millis(1),
            max_sleep: Duration::from_millis(10),
        }
    }

    /// Also gives up when `signal` is raised.
    pub(crate) fn with_signal(mut self, signal: &AbortSignal) -> Watchdog {
        self.signal = Some(signal.clone());
        self
    }

    /// Yields (instead of sleeping) for the first `spin` of each wait.
    pub(crate) fn spin(mut self, spin: Duration) -> Watchdog {
        self.spin = spin;
        self
    }

    /// Sleeps between polls start at `first` and double up to `max`.
    pub(crate) fn sleeps(mut self, first: Duration, max: Duration) -> Watchdog {
        self.first_sleep = first;
        self.max_sleep = max.max(first);
        self
    }

    /// Time left before the deadline (zero once it passed).
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Polls `w` until it is done (its output), fails, is cancelled or the deadline passes (aborted, and why).
    /// A completed operation wins over a deadline that passed while it completed: the status is polled before the
    /// deadline is checked, and at least once even with a zero timeout.
    pub(crate) fn wait<W: Watched>(&self, w: &mut W) -> Result<W::Output, WaitError<W::Error>> {
        let start = Instant::now();
        let mut sleep = self.first_sleep;
        loop {
            match w.poll() {
                Status::Done(out) => return Ok(out),
                Status::Failed(e) => {
                    w.abort();
                    return Err(WaitError::Failed(e));
                }
                Status::Pending => {}
            }
            if let Some(reason) = self.signal.as_ref().and_then(AbortSignal::reason) {
                w.abort();
                return Err(WaitError::Cancelled {
                    op: self.op,
                    reason,
                });
            }
            let now = Instant::now();
            if now >= self.deadline {
                w.abort();
                return Err(WaitError::TimedOut {
                    op: self.op,
                    timeout: self.timeout,
                });
            }
            if now.duration_since(start) < self.spin {
                std::thread::yield_now();
            } else {
                std::thread::sleep(sleep.min(self.deadline - now));
                sleep = (sleep * 2).min(self.max_sleep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake communicator: answers `Pending` `pending` times, then `end` (or pending forever); counts polls
    /// and aborts.
    struct FakeComm {
        pending: usize,
        end: Option<Result<u32, &'static str>>,
        polls: usize,
        aborts: usize,
    }

    impl FakeComm {
        fn new(pending: usize, end: Option<Result<u32, &'static str>>) -> FakeComm {
            FakeComm {
                pending,
                end,
                polls: 0,
                aborts: 0,
            }
        }
    }

    impl Watched for FakeComm {
        type Output = u32;
        type Error = &'static str;

        fn poll(&mut self) -> Status<u32, &'static str> {
            assert_eq!(self.aborts, 0, "polled after an abort");
            self.polls += 1;
            if self.polls <= self.pending {
                return Status::Pending;
            }
            match self.end {
                None => Status::Pending,
                Some(Ok(v)) => Status::Done(v),
                Some(Err(e)) => Status::Failed(e),
            }
        }

        fn abort(&mut self) {
            self.aborts += 1;
        }
    }

    fn dog(timeout: Duration) -> Watchdog {
        Watchdog::new("ncclAllReduce", timeout)
            .sleeps(Duration::from_micros(50), Duration::from_micros(200))
    }

    #[test]
    fn ok_is_done_without_an_abort() {
        let mut c = FakeComm::new(0, Some(Ok(7)));
        assert_eq!(dog(Duration::from_secs(60)).wait(&mut c).unwrap(), 7);
        assert_eq!((c.polls, c.aborts), (1, 0));
        // Pending a few times, then done.
        let mut c = FakeComm::new(5, Some(Ok(8)));
        assert_eq!(
            dog(Duration::from_secs(60))
                .spin(Duration::from_millis(1))
                .wait(&mut c)
                .unwrap(),
            8
        );
        assert_eq!((c.polls, c.aborts), (6, 0));
    }

    #[test]
    fn an_error_status_aborts_and_returns_the_error() {
        let mut c = FakeComm::new(3, Some(Err("ncclRemoteError")));
        match dog(Duration::from_secs(60)).wait(&mut c) {
            Err(WaitError::Failed("ncclRemoteError")) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!((c.polls, c.aborts), (4, 1));
    }

    #[test]
    fn a_passed_deadline_aborts_and_names_the_op_and_the_timeout() {
        let timeout = Duration::from_millis(30);
        let mut c = FakeComm::new(0, None);
        match dog(timeout).wait(&mut c) {
            Err(WaitError::TimedOut { op, timeout: t }) => {
                assert_eq!(op, "ncclAllReduce");
                assert_eq!(t, timeout);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.aborts, 1);
        assert!(c.polls > 1, "it polled while waiting ({} polls)", c.polls);
        // A zero timeout still polls once: an operation that is already done is not aborted.
        let mut c = FakeComm::new(0, Some(Ok(1)));
        assert_eq!(dog(Duration::ZERO).wait(&mut c).unwrap(), 1);
        assert_eq!(c.aborts, 0);
        let mut c = FakeComm::new(0, None);
        assert!(matches!(
            dog(Duration::ZERO).wait(&mut c),
            Err(WaitError::TimedOut { .. })
        ));
        assert_eq!((c.polls, c.aborts), (1, 1));
    }

    #[test]
    fn a_raised_signal_aborts_with_its_reason() {
        let signal = AbortSignal::new();
        assert_eq!(signal.reason(), None);
        let raiser = signal.clone();
        let mut c = FakeComm::new(0, None);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            raiser.abort("the coordinator ended round 3");
            raiser.abort("a later reason is ignored");
        });
        let r = dog(Duration::from_secs(60))
            .with_signal(&signal)
            .wait(&mut c);
        t.join().unwrap();
        match r {
            Err(WaitError::Cancelled { op, reason }) => {
                assert_eq!(op, "ncclAllReduce");
                assert_eq!(reason, "the coordinator ended round 3");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.aborts, 1);
        // Raised before the wait: the first poll still reports a finished operation.
        let mut c = FakeComm::new(0, Some(Ok(2)));
        assert_eq!(
            dog(Duration::from_secs(60))
                .with_signal(&signal)
                .wait(&mut c)
                .unwrap(),
            2
        );
        assert_eq!(c.aborts, 0);
    }

    #[test]
    fn closures_make_a_watched_operation() {
        let mut n = 0;
        let mut aborted = false;
        let mut w = FnWatched {
            poll: || {
                n += 1;
                if n < 3 {
                    Status::Pending
                } else {
                    Status::<usize, ()>::Done(n)
                }
            },
            abort: || aborted = true,
        };
        assert_eq!(dog(Duration::from_secs(60)).wait(&mut w).unwrap(), 3);
        assert!(!aborted);
    }
}
