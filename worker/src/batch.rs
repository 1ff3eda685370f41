//! Batching of decoded volumes into libtorch tensors.

use tch::Tensor;

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
}
