//! Progress bars for long conversions: drawn only on a terminal, hidden otherwise (logs and CI stay clean).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub fn bar(len: u64, label: &str, wanted: bool) -> ProgressBar {
    bar_of(len, label, "volumes", wanted)
}

/// [`bar`] counting `unit` (`volumes`, `samples`, ...).
pub fn bar_of(len: u64, label: &str, unit: &str, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        &format!("{{prefix:>8}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"),
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar
}
