//! Helpers the benchmark binaries share.

/// The median of the samples (the upper one of the middle two for an even
/// count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}
