//! Fault injection for the failure tests: named places in the code that pause when the environment asks
//! them to, so that a test can kill a process or stop a server at an exact point (mid-upload, before a
//! commit record) instead of racing a millisecond window.
//!
//! `M3D_FAILPOINTS="checkpoint-before-commit=2000"` pauses 2000 ms each time the named point is reached;
//! several are separated by `,`. Unset (always, outside tests), a point costs one lookup in an empty list.

use std::sync::OnceLock;
use std::time::Duration;

/// The variable that configures the points.
pub const ENV: &str = "M3D_FAILPOINTS";

fn points() -> &'static [(String, Duration)] {
    static POINTS: OnceLock<Vec<(String, Duration)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let Ok(spec) = std::env::var(ENV) else {
            return Vec::new();
        };
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .filter_map(|item| {
                let parsed = item.split_once('=').and_then(|(name, ms)| {
                    Some((name.trim().to_string(), ms.trim().parse().ok()?))
                });
                if parsed.is_none() {
                    tracing::warn!(item, "{ENV}: expected name=milliseconds; ignored");
                }
                parsed.map(|(n, ms)| (n, Duration::from_millis(ms)))
            })
            .collect()
    })
}

/// Pauses here if `name` is configured.
pub fn pause(name: &str) {
    if let Some((_, d)) = points().iter().find(|(n, _)| n == name) {
        tracing::warn!(
            failpoint = name,
            ms = d.as_millis() as u64,
            "failpoint: pausing"
        );
        std::thread::sleep(*d);
    }
}
