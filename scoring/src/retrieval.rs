//! Image-text retrieval Recall@K (reference: `calculate_recall` in `Bench/eval/eval_itr.py` lines 38-43).

use crate::ScoreError;

/// Which side of the similarity matrix asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryAxis {
    /// Each row is a query and its match is the column with the same index (the reference's
    /// `calculate_recall(scores_mat, k)` on `image_features @ text_features.T`).
    Rows,
    /// Each column is a query (the reference's `calculate_recall(scores_mat.transpose(0, 1), k)`).
    Columns,
}

/// Share of queries whose match is among their `k` most similar candidates, in an `n x n` row-major
/// similarity matrix whose diagonal holds the true pairs.
///
/// A query's match ranks after every candidate with a strictly higher similarity and, on ties, after the
/// tied candidates with a lower index (the order of a stable descending sort; `torch.topk` leaves ties
/// unspecified). `k` above `n` is an error, as `torch.topk` raises there; so are `k = 0` and NaN.
pub fn recall_at_k(sim: &[f32], n: usize, k: usize, axis: QueryAxis) -> Result<f64, ScoreError> {
    if sim.len() != n.saturating_mul(n) {
        return Err(ScoreError::LengthMismatch {
            what: "similarity matrix",
            expected: n.saturating_mul(n),
            got: sim.len(),
        });
    }
    if k == 0 || k > n {
        return Err(ScoreError::BadK { k, candidates: n });
    }
    if sim.iter().any(|v| v.is_nan()) {
        return Err(ScoreError::NanSimilarity);
    }
    let at = |query: usize, candidate: usize| match axis {
        QueryAxis::Rows => sim[query * n + candidate],
        QueryAxis::Columns => sim[candidate * n + query],
    };
    let hits = (0..n)
        .filter(|&q| {
            let own = at(q, q);
            let ahead = (0..n)
                .filter(|&c| at(q, c) > own || (at(q, c) == own && c < q))
                .count();
            ahead < k
        })
        .count();
    Ok(hits as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_by_hand() {
        // Row 0: own 0.9 is best. Row 1: own 0.5 is third (0.8, 0.6 ahead). Row 2: own 0.7 is second.
        let sim = [0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.1, 0.9, 0.7];
        assert_eq!(recall_at_k(&sim, 3, 1, QueryAxis::Rows).unwrap(), 1.0 / 3.0);
        assert_eq!(recall_at_k(&sim, 3, 2, QueryAxis::Rows).unwrap(), 2.0 / 3.0);
        assert_eq!(recall_at_k(&sim, 3, 3, QueryAxis::Rows).unwrap(), 1.0);
        // Columns: col 0 = [0.9, 0.8, 0.1] own first; col 1 = [0.1, 0.5, 0.9] own second; col 2 = [0.2, 0.6, 0.7] first.
        assert_eq!(
            recall_at_k(&sim, 3, 1, QueryAxis::Columns).unwrap(),
            2.0 / 3.0
        );
    }

    #[test]
    fn ties_rank_lower_indices_first_and_bad_inputs_fail() {
        let sim = [1.0, 1.0, 1.0, 1.0];
        // Query 0 wins its tie with candidate 1; query 1 loses it.
        assert_eq!(recall_at_k(&sim, 2, 1, QueryAxis::Rows).unwrap(), 0.5);
        assert!(matches!(
            recall_at_k(&sim, 2, 3, QueryAxis::Rows),
            Err(ScoreError::BadK {
                k: 3,
                candidates: 2
            })
        ));
        assert!(matches!(
            recall_at_k(&sim, 2, 0, QueryAxis::Rows),
            Err(ScoreError::BadK { .. })
        ));
        assert!(matches!(
            recall_at_k(&sim, 3, 1, QueryAxis::Rows),
            Err(ScoreError::LengthMismatch { .. })
        ));
        assert!(matches!(
            recall_at_k(&[f32::NAN], 1, 1, QueryAxis::Rows),
            Err(ScoreError::NanSimilarity)
        ));
    }
}
