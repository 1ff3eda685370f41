//! How the m3d binaries (`m3d`, `m3d-coordinator`, `m3d-data-prep`) show an error: one line, each level of the
//! cause chain once.
//!
//! The project's library errors put their cause into their own message (so that a log line showing only the
//! top level, `error = %e`, is complete) and also expose it as `source()` (so that callers can inspect it);
//! `object_store`, `reqwest` and `hyper` errors do the same. Printing such a chain with `{:#}` repeats every
//! cause once per level above it. Here a level is shown only when the text printed so far does not already
//! contain it, so each level adds its context once, whichever of the two conventions it follows.

use std::fmt::Write;

/// `e` and its causes, outermost first, joined by ": ", without repeating a cause that an outer level
/// already shows.
pub fn render(e: &anyhow::Error) -> String {
    render_chain(e.chain().map(|c| c.to_string()))
}

fn render_chain(levels: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    for msg in levels {
        let msg = msg.trim();
        if msg.is_empty() || out.contains(msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        let _ = write!(out, "{msg}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("shard `{key}`: checksum mismatch; the shard is corrupted")]
    struct Leaf {
        key: String,
    }

    /// Includes its cause in its message and exposes it as the source: shown once.
    #[derive(Debug, thiserror::Error)]
    #[error("dataset `{url}`: {source}")]
    struct Inline {
        url: String,
        #[source]
        source: Leaf,
    }

    /// Only exposes its cause: the chain shows it.
    #[derive(Debug, thiserror::Error)]
    #[error("reading the recipe")]
    struct Outer {
        #[source]
        source: Inline,
    }

    #[test]
    fn each_level_appears_once() {
        let leaf = Leaf {
            key: "volumes/part-00000.parquet".into(),
        };
        let e = anyhow::Error::new(Outer {
            source: Inline {
                url: "out/cap".into(),
                source: leaf,
            },
        })
        .context("m3d train recipes/clip-tiny.yaml");
        let text = render(&e);
        assert_eq!(
            text,
            "m3d train recipes/clip-tiny.yaml: reading the recipe: dataset `out/cap`: shard \
             `volumes/part-00000.parquet`: checksum mismatch; the shard is corrupted"
        );
        assert_eq!(text.matches("checksum mismatch").count(), 1);
        // `{:#}` is what this replaces: it repeats the leaf.
        assert_eq!(format!("{e:#}").matches("checksum mismatch").count(), 2);
    }

    #[test]
    fn causes_not_in_the_message_are_kept() {
        let e = anyhow::Error::new(std::io::Error::other("No such file or directory"))
            .context("read recipe r.yaml");
        assert_eq!(render(&e), "read recipe r.yaml: No such file or directory");
    }
}
