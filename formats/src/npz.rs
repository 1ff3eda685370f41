//! NumPy `.npz` archives: zip files of `.npy` members, as written by `np.savez` / `np.savez_compressed`
//! (and by `scipy.sparse.save_npz`). Keys are member names without the `.npy` suffix.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

use crate::error::FormatError;
use crate::npy::{encode_npy, parse_npy, NpyArray};

fn npz_err(path: &Path, reason: String) -> FormatError {
    FormatError::Npz {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads every member of a `.npz` file. Errors inside a member name both the archive and the member.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, FormatError> {
    let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    read_npz_from(std::io::BufReader::new(file), path)
}

/// Reads a `.npz` archive from memory; `name` is used only in error messages.
pub fn parse_npz(bytes: &[u8], name: &Path) -> Result<BTreeMap<String, NpyArray>, FormatError> {
    read_npz_from(std::io::Cursor::new(bytes), name)
}

fn read_npz_from<R: Read + std::io::Seek>(
    reader: R,
    path: &Path,
) -> Result<BTreeMap<String, NpyArray>, FormatError> {
    let mut archive = zip::ZipArchive::new(reader)
        .map_err(|e| npz_err(path, format!("not a readable zip archive: {e}")))?;
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let mut member = archive
            .by_index(i)
            .map_err(|e| npz_err(path, format!("member #{i}: {e}")))?;
        if member.is_dir() {
            continue;
        }
        let name = member.name().to_string();
        // The declared size comes from the archive, so it only sizes the first allocation up to a cap.
        let hint = usize::try_from(member.size()).unwrap_or(0).min(1 << 28);
        let mut bytes = Vec::with_capacity(hint);
        member
            .read_to_end(&mut bytes)
            .map_err(|e| npz_err(path, format!("member {name:?}: {e}")))?;
        // The member name is part of the path in messages so that "mask.npz/data.npy" locates the problem.
        let arr = parse_npy(&bytes, &path.join(&name)).map_err(|e| match e {
            FormatError::Npy { path: p, reason } => FormatError::Npz {
                path: p,
                reason: format!("member is not a valid .npy: {reason}"),
            },
            other => other,
        })?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        if out.insert(key.clone(), arr).is_some() {
            return Err(npz_err(path, format!("duplicate member {key:?}")));
        }
    }
    Ok(out)
}

/// Writes a `.npz` file with one `<key>.npy` member per array, in the given order (deflate when
/// `compressed`, as `np.savez_compressed`; stored otherwise, as `np.savez`).
pub fn write_npz(
    path: &Path,
    arrays: &[(&str, &NpyArray)],
    compressed: bool,
) -> Result<(), FormatError> {
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in arrays {
        if key.is_empty() || !seen.insert(*key) {
            return Err(npz_err(path, format!("empty or duplicate key {key:?}")));
        }
    }
    let file = std::fs::File::create(path).map_err(|e| FormatError::io(path, e))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let method = if compressed {
        CompressionMethod::Deflated
    } else {
        CompressionMethod::Stored
    };
    for (key, arr) in arrays {
        let bytes = encode_npy(arr);
        let opts = SimpleFileOptions::default()
            .compression_method(method)
            // Zip64 records are only needed (and only written) for members of 4 GiB or more.
            .large_file(bytes.len() as u64 >= u64::from(u32::MAX));
        let zerr = |e: zip::result::ZipError| npz_err(path, format!("writing {key:?}: {e}"));
        zip.start_file(format!("{key}.npy"), opts).map_err(zerr)?;
        zip.write_all(&bytes)
            .map_err(|e| FormatError::io(path, e))?;
    }
    let mut inner = zip
        .finish()
        .map_err(|e| npz_err(path, format!("finishing archive: {e}")))?;
    inner.flush().map_err(|e| FormatError::io(path, e))
}
