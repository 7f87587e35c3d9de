//! The duration percentiles of the status page, from cumulative histogram buckets as
//! Prometheus reads them: the observations of a window, and a quantile interpolated in its
//! bucket.

/// Observations per bucket since `start` (cumulative counts of both).
pub(super) fn bucket_deltas(now: &[(f64, u64)], start: Option<&[(f64, u64)]>) -> Vec<(f64, u64)> {
    now.iter()
        .enumerate()
        .map(|(i, (bound, count))| {
            let before = start.and_then(|start| start.get(i)).map_or(0, |(_, count)| *count);
            (*bound, count.saturating_sub(before))
        })
        .collect()
}

/// The `q` quantile of cumulative `buckets`, interpolated in its bucket as Prometheus's
/// `histogram_quantile` does; `None` without observations.
pub(super) fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last().map(|(_, count)| *count)?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if bound.is_infinite() {
                // Above the last finite bound: that bound is the best estimate, as
                // Prometheus says.
                return Some(lower.0);
            }
            let in_bucket = (count - lower.1) as f64;
            let fraction = if in_bucket > 0.0 { (rank - lower.1 as f64) / in_bucket } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_in_their_bucket() {
        let buckets = [(0.1, 50), (0.5, 90), (1.0, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&buckets, 0.5), Some(0.1));
        let p95 = quantile(&buckets, 0.95).unwrap();
        assert!((p95 - 0.75).abs() < 1e-9, "{p95}");
        assert_eq!(quantile(&[(0.1, 0), (f64::INFINITY, 0)], 0.5), None);
        assert_eq!(quantile(&[(0.1, 0), (f64::INFINITY, 4)], 0.5), Some(0.1));
    }

    #[test]
    fn deltas_count_what_came_since() {
        let deltas = bucket_deltas(&[(0.1, 5), (1.0, 9)], Some(&[(0.1, 2), (1.0, 3)]));
        assert_eq!(deltas, vec![(0.1, 3), (1.0, 6)]);
        assert_eq!(bucket_deltas(&[(0.1, 5)], None), vec![(0.1, 5)]);
    }
}
