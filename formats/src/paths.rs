//! Resolution of relative paths found inside dataset files (split JSONs, VQA/RefSeg CSVs) against a source
//! root. These strings are data, not trusted configuration, so they are checked lexically before any file
//! system access: a crafted entry must not make a conversion read outside the data root.

use std::path::{Path, PathBuf};

use crate::error::FormatError;

/// Joins a path taken from a dataset file (JSON/CSV) onto the source root; rejects absolute paths, `..`
/// components, empty paths and anything that would escape `root`, with [`FormatError::UnsafePath`] naming
/// the value. `.` components and repeated slashes are dropped. Backslashes and NUL bytes are rejected
/// rather than guessed at, since dataset paths always use `/`. The check is lexical: symbolic links inside
/// `root` are followed by later file access as usual.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf, FormatError> {
    let reject = |reason: &str| FormatError::UnsafePath {
        root: root.to_path_buf(),
        rel: rel.to_string(),
        reason: reason.to_string(),
    };
    if rel.trim().is_empty() {
        return Err(reject("empty path"));
    }
    if rel.contains('\0') {
        return Err(reject("contains a NUL byte"));
    }
    if rel.contains('\\') {
        return Err(reject("contains a backslash (dataset paths use '/')"));
    }
    if rel.starts_with('/') {
        return Err(reject("absolute path"));
    }
    let bytes = rel.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(reject("drive-qualified (absolute) path"));
    }
    let mut out = root.to_path_buf();
    let mut pushed = 0usize;
    for comp in rel.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(reject("'..' component")),
            c => {
                out.push(c);
                pushed += 1;
            }
        }
    }
    if pushed == 0 {
        return Err(reject("names the root itself"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_and_normalises() {
        let r = Path::new("/data");
        assert_eq!(
            safe_join(r, "ct_case/000006/./x.npy").unwrap(),
            Path::new("/data/ct_case/000006/x.npy")
        );
        assert_eq!(safe_join(r, "a//b").unwrap(), Path::new("/data/a/b"));
        assert!(safe_join(r, "./.").is_err());
        assert!(safe_join(r, "a/../../b").is_err());
        assert!(safe_join(r, "C:/x").is_err());
        assert!(safe_join(r, "a\\..\\b").is_err());
        assert!(safe_join(r, "   ").is_err());
    }
}
