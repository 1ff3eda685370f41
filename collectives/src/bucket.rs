//! Gradient bucketing: many small tensors reduced as a few large flat buffers.
//!
//! One collective per parameter would pay the ring's per-operation latency hundreds of times per step; one flat
//! buffer of everything would need a second copy of all gradients. Buckets of at most N MiB are the usual middle
//! (DDP's default is 25 MiB). The grouping depends only on the list of tensors (their order, sizes, dtypes and
//! devices) and the order they are bucketed in, so every rank builds the same buckets and the reduction order is
//! deterministic. To overlap with the backward pass, the buckets follow the order the gradients become final
//! ([`Bucketer::with_order`]) and are reduced one at a time as they fill ([`Bucketer::reduce_bucket`]).

use tch::{Device, Kind, Tensor};

use crate::error::CollectiveError;
use crate::{Collective, ReduceOp, Result};

#[derive(Debug)]
struct Member {
    index: usize,
    numel: i64,
}

#[derive(Debug)]
struct Bucket {
    kind: Kind,
    device: Device,
    members: Vec<Member>,
    numel: i64,
    /// The flat buffer, allocated on first use and reused every step.
    flat: Option<Tensor>,
}

/// Groups a list of tensors into flat buckets of at most `max_bytes` and all-reduces them.
///
/// Consecutive tensors of the same dtype and device share a bucket until adding the next one would exceed
/// `max_bytes`; a tensor larger than that gets a bucket of its own.
#[derive(Debug)]
pub struct Bucketer {
    buckets: Vec<Bucket>,
    count: usize,
}

fn bucket_err(detail: String) -> CollectiveError {
    CollectiveError::Bucket(detail)
}

fn torch(op: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
    move |e| bucket_err(format!("{op}: {e}"))
}

impl Bucketer {
    /// Plans the buckets for `tensors` (e.g. the trainable parameters' gradients, in a fixed order).
    pub fn new(tensors: &[Tensor], max_bytes: usize) -> Result<Bucketer> {
        let order: Vec<usize> = (0..tensors.len()).collect();
        Bucketer::with_order(tensors, &order, max_bytes)
    }

    /// Plans the buckets for `tensors` taken in `order` (a permutation of their indices: e.g. the order in which
    /// the backward pass finishes the gradients); a bucket holds consecutive tensors of that order.
    pub fn with_order(tensors: &[Tensor], order: &[usize], max_bytes: usize) -> Result<Bucketer> {
        let mut seen = vec![false; tensors.len()];
        let permutation = order.len() == tensors.len()
            && order
                .iter()
                .all(|&i| i < seen.len() && !std::mem::replace(&mut seen[i], true));
        if !permutation {
            return Err(bucket_err(format!(
                "the bucket order is not a permutation of the {} tensors",
                tensors.len()
            )));
        }
        let mut buckets: Vec<Bucket> = Vec::new();
        for &index in order {
            let t = &tensors[index];
            if !t.defined() {
                return Err(bucket_err(format!(
                    "tensor {index} is undefined (a parameter without a gradient?)"
                )));
            }
            let (kind, device) = (t.kind(), t.device());
            let numel = t.numel() as i64;
            let bytes = |n: i64| n as usize * kind.elt_size_in_bytes();
            let fits = buckets.last().is_some_and(|b| {
                b.kind == kind && b.device == device && bytes(b.numel + numel) <= max_bytes
            });
            match buckets.last_mut() {
                Some(b) if fits => {
                    b.members.push(Member { index, numel });
                    b.numel += numel;
                }
                _ => buckets.push(Bucket {
                    kind,
                    device,
                    members: vec![Member { index, numel }],
                    numel,
                    flat: None,
                }),
            }
        }
        Ok(Bucketer {
            buckets,
            count: tensors.len(),
        })
    }

    /// Plans with a limit in MiB.
    pub fn with_mib(tensors: &[Tensor], max_mib: usize) -> Result<Bucketer> {
        Bucketer::new(tensors, max_mib << 20)
    }

    /// The number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether there are no buckets (no tensors).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The tensor indices in each bucket, in reduction order.
    pub fn layout(&self) -> Vec<Vec<usize>> {
        self.buckets
            .iter()
            .map(|b| b.members.iter().map(|m| m.index).collect())
            .collect()
    }

    /// Reduces every tensor of `tensors` (the same list, in the same order, as at planning) over all ranks:
    /// copies each bucket's tensors into its flat buffer, all-reduces the buffer, and copies the results back
    /// into the tensors in place.
    pub fn all_reduce(
        &mut self,
        comm: &mut dyn Collective,
        tensors: &mut [Tensor],
        op: ReduceOp,
    ) -> Result<()> {
        for b in 0..self.buckets.len() {
            self.reduce_bucket(b, comm, tensors, op)?;
        }
        Ok(())
    }

    /// Reduces bucket `b` (an index into [`Bucketer::layout`]) of `tensors` (the whole list, as at planning;
    /// only this bucket's members are read and written). Every rank must reduce the buckets in the same order.
    pub fn reduce_bucket(
        &mut self,
        b: usize,
        comm: &mut dyn Collective,
        tensors: &mut [Tensor],
        op: ReduceOp,
    ) -> Result<()> {
        if tensors.len() != self.count {
            return Err(bucket_err(format!(
                "planned for {} tensors, given {}",
                self.count,
                tensors.len()
            )));
        }
        let count = self.buckets.len();
        let Some(b) = self.buckets.get_mut(b) else {
            return Err(bucket_err(format!("no bucket {b} (of {count})")));
        };
        let _guard = tch::no_grad_guard();
        for m in &b.members {
            let t = &tensors[m.index];
            if !t.defined()
                || t.numel() as i64 != m.numel
                || t.kind() != b.kind
                || t.device() != b.device
            {
                return Err(bucket_err(format!(
                    "tensor {} changed since planning: {} elements of {:?} on {:?} planned",
                    m.index, m.numel, b.kind, b.device
                )));
            }
        }
        let flat = match &mut b.flat {
            Some(f) => f,
            None => b
                .flat
                .insert(Tensor::f_empty([b.numel], (b.kind, b.device)).map_err(torch("allocate"))?),
        };
        let mut offset = 0;
        for m in &b.members {
            let src = tensors[m.index].f_reshape([-1]).map_err(torch("flatten"))?;
            flat.f_narrow(0, offset, m.numel)
                .and_then(|mut d| d.f_copy_(&src))
                .map_err(torch("copy in"))?;
            offset += m.numel;
        }
        comm.all_reduce(flat, op)?;
        let mut offset = 0;
        for m in &b.members {
            let t = &mut tensors[m.index];
            let src = flat
                .f_narrow(0, offset, m.numel)
                .and_then(|s| s.f_view(t.size().as_slice()));
            src.and_then(|s| t.f_copy_(&s)).map_err(torch("copy out"))?;
            offset += m.numel;
        }
        Ok(())
    }
}
