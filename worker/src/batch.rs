//! Batching of decoded volumes into libtorch tensors, and moving a batch to its device ([`to_device`]).
//!
//! ## Host to GPU
//! A copy from pageable host memory to a GPU is staged by the driver and waits for the stream: the thread
//! that makes it blocks until every kernel queued before it has run. A batch is therefore first copied into
//! page-locked (pinned) memory, on the thread that builds batches, and sent from there with a non-blocking
//! copy ([`Transfer::for_device`]). `tch` has no stream API: the copy goes on the device's current stream,
//! the default one on every thread, so the kernels the training thread queues later are ordered after it
//! (what makes reading the batch correct) and the GPU runs it between the training thread's kernels.
//!
//! The pinned buffer must not be reused before the copy has read it. It comes from libtorch's caching host
//! allocator, which records an event on the stream for every non-blocking copy out of its blocks and hands
//! a freed block out again only once that event has completed — the mechanism behind PyTorch's
//! `DataLoader(pin_memory=True)` + `.to(device, non_blocking=True)` — so the staging tensor may be dropped as
//! soon as the copy is queued, and the allocator's pool is the double buffer. On the CPU nothing is pinned
//! or copied.

use tch::{Device, Kind, TchError, Tensor};

/// Errors building a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch is empty")]
    Empty,
    #[error("volume {index} has shape {found:?}, the batch expects {expected:?}")]
    Shape {
        index: usize,
        expected: [usize; 4],
        found: [usize; 4],
    },
    #[error("volume {index} holds {found} values, its shape {shape:?} needs {needed}")]
    Length {
        index: usize,
        shape: [usize; 4],
        needed: usize,
        found: usize,
    },
}

/// Stacks decoded `C x D x H x W` volumes (as written by `m3d_shards::dataset::decode_sample_into`) into one
/// `B x C x D x H x W` float tensor on the CPU (the volumes are gathered into one buffer, which libtorch copies).
pub fn stack_volumes(volumes: &[(&[f32], [usize; 4])]) -> Result<Tensor, BatchError> {
    let (_, shape) = volumes.first().ok_or(BatchError::Empty)?;
    let shape = *shape;
    let per: usize = shape.iter().product();
    let mut flat = Vec::with_capacity(per * volumes.len());
    for (index, (data, s)) in volumes.iter().enumerate() {
        if *s != shape {
            return Err(BatchError::Shape {
                index,
                expected: shape,
                found: *s,
            });
        }
        if data.len() != per {
            return Err(BatchError::Length {
                index,
                shape: *s,
                needed: per,
                found: data.len(),
            });
        }
        flat.extend_from_slice(data);
    }
    let dims: Vec<i64> = std::iter::once(volumes.len())
        .chain(shape)
        .map(|d| d as i64)
        .collect();
    Ok(Tensor::from_slice(&flat).reshape(dims))
}

/// How a host tensor goes to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Copy it into pinned host memory first.
    pub pin: bool,
    /// Copy it without waiting for the stream (only safe from pinned memory, see the module docs).
    pub non_blocking: bool,
}

impl Transfer {
    /// For a host tensor going to `device`: to a GPU, pinned and non-blocking; on the CPU, neither (the
    /// tensor is used where it is).
    pub fn for_device(device: Device) -> Transfer {
        let gpu = device.is_cuda();
        Transfer {
            pin: gpu,
            non_blocking: gpu,
        }
    }
}

/// A host tensor `t` on `device` as `kind`, the way [`Transfer::for_device`] says: pinned and non-blocking to
/// a GPU (then converted there, as `to_device(..).to_kind(..)` does); unchanged on the CPU but for `kind`.
pub fn to_device(t: &Tensor, device: Device, kind: Kind) -> Result<Tensor, TchError> {
    let how = Transfer::for_device(device);
    let moved = if t.device() == device {
        t.shallow_clone()
    } else if how.pin {
        // `_pin_memory` with the device type: `pin_memory(device)` warns on every call that passing a device
        // is deprecated, and tch always passes one.
        t.f_internal_pin_memory(device)?
            .f_to_device_(device, t.kind(), how.non_blocking, false)?
    } else {
        t.f_to_device_(device, t.kind(), how.non_blocking, false)?
    };
    moved.f_to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn stacks_in_order_and_checks_shapes() {
        let a: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let b: Vec<f32> = (8..16).map(|v| v as f32).collect();
        let t = stack_volumes(&[(&a, [1, 2, 2, 2]), (&b, [1, 2, 2, 2])]).unwrap();
        assert_eq!(t.size(), vec![2, 1, 2, 2, 2]);
        assert_eq!(t.double_value(&[1, 0, 1, 1, 1]), 15.0);
        assert_eq!(
            t.sum(Kind::Float).double_value(&[]),
            (0..16).sum::<i32>() as f64
        );
        assert!(matches!(
            stack_volumes(&[(&a, [1, 2, 2, 2]), (&b, [1, 1, 2, 4])]),
            Err(BatchError::Shape { index: 1, .. })
        ));
        assert!(matches!(
            stack_volumes(&[(&a[..7], [1, 2, 2, 2])]),
            Err(BatchError::Length { index: 0, .. })
        ));
    }

    #[test]
    fn gpu_copies_are_pinned_and_non_blocking_cpu_ones_untouched() {
        let gpu = Transfer {
            pin: true,
            non_blocking: true,
        };
        assert_eq!(Transfer::for_device(Device::Cuda(0)), gpu);
        assert_eq!(Transfer::for_device(Device::Cuda(3)), gpu);
        assert_eq!(
            Transfer::for_device(Device::Cpu),
            Transfer {
                pin: false,
                non_blocking: false,
            }
        );
        // On the CPU: the same values and storage, converted only when asked.
        let t = Tensor::from_slice(&[1.5f32, -2.25, 3.0]);
        let same = to_device(&t, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(same.data_ptr(), t.data_ptr());
        let bf = to_device(&t, Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(bf.kind(), Kind::BFloat16);
        assert!(bf.to_kind(Kind::Float).equal(
            &t.to_device(Device::Cpu)
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float)
        ));
    }
}
