//! Where the NCCL shared library is looked for: the one libtorch itself uses.
//!
//! Why m3d finds (and opens) NCCL itself instead of leaving it to `cudarc`'s dynamic loader: `cudarc` 0.19 opens
//! `libnccl.so`, `libnccl.so.13`, `libnccl.so.12`, … `libnccl.so.1` by bare name, never `libnccl.so.2` — the only
//! file the torch wheel ships (`<site-packages>/nvidia/nccl/lib/libnccl.so.2`, which `libtorch_cuda.so` finds
//! through its RPATH). It cannot be pointed elsewhere: the names are fixed, the handle lives in a private
//! `OnceLock`, `LD_LIBRARY_PATH` is read by the dynamic linker once, at process start, and preloading the file does
//! not help either, because glibc matches a bare name against a loaded object's path and SONAME (`libnccl.so.2`),
//! neither of which is `libnccl.so`. A `libnccl.so` symlink would need `LD_LIBRARY_PATH` set before the process
//! starts (a wrapper script, or re-executing ourselves). So `raw::nccl` opens the file found here by its full path
//! and calls NCCL through its own table of the dozen entry points m3d uses; `cudarc` still provides NCCL's C types
//! and the CUDA driver API.
//!
//! The search, in order (the first candidate that loads and exports every entry point wins):
//! 1. `M3D_NCCL_LIB`, a path to the library: used alone — a wrong path is an error, never a silent fallback.
//! 2. A `libnccl.so*` already mapped into this process: `libtorch_cuda.so` links it, so this is the very NCCL torch
//!    runs with (one copy in memory, the version torch was built against).
//! 3. Next to libtorch, wherever it was loaded from (`/proc/self/maps`): `<torch/lib>/../../nvidia/nccl/lib/
//!    libnccl.so.2` (the wheel layout) and `<torch/lib>/libnccl.so.2`.
//! 4. The dynamic linker's search path (`LD_LIBRARY_PATH`, `ld.so.cache`): `libnccl.so.2`, then `libnccl.so`.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable naming the NCCL library to use.
pub(crate) const ENV: &str = "M3D_NCCL_LIB";

/// Why a candidate is on the list (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// From `M3D_NCCL_LIB`.
    Explicit,
    /// Already mapped into this process (loaded by libtorch).
    Loaded,
    /// Found next to libtorch's folder.
    NextToLibtorch(PathBuf),
    /// A bare name for the dynamic linker's search path.
    System,
}

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// A path, or a bare name for the dynamic linker.
    pub(crate) target: PathBuf,
    pub(crate) origin: Origin,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.target.display();
        match &self.origin {
            Origin::Explicit => write!(f, "{t} (from {ENV})"),
            Origin::Loaded => write!(f, "{t} (already loaded by libtorch)"),
            Origin::NextToLibtorch(dir) => write!(f, "{t} (next to libtorch in {})", dir.display()),
            Origin::System => write!(f, "{t} (dynamic linker search path)"),
        }
    }
}

/// The files mapped into a process, from the text of its `/proc/<pid>/maps`, in order of appearance, without
/// repeats; deleted files are left out.
pub(crate) fn mapped_files(maps: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode [pathname] — the path is the rest of the line and may hold spaces.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            match rest.find(char::is_whitespace) {
                Some(i) => rest = &rest[i..],
                None => {
                    rest = "";
                    break;
                }
            }
        }
        let path = rest.trim();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let p = PathBuf::from(path);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn file_name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|n| n.starts_with(prefix))
}

/// The candidates, in order, given the value of `M3D_NCCL_LIB` and the text of `/proc/self/maps`. Paths that are
/// guessed (next to libtorch) are listed only where a file exists; a path given explicitly is listed as given.
pub(crate) fn candidates(explicit: Option<&OsStr>, maps: &str) -> Vec<Candidate> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        return vec![Candidate {
            target: PathBuf::from(p),
            origin: Origin::Explicit,
        }];
    }
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |c: Candidate| {
        if !out.iter().any(|o| o.target == c.target) {
            out.push(c);
        }
    };
    let mapped = mapped_files(maps);
    for p in mapped.iter().filter(|p| file_name_starts(p, "libnccl.so")) {
        push(Candidate {
            target: p.clone(),
            origin: Origin::Loaded,
        });
    }
    let mut torch_dirs: Vec<&Path> = Vec::new();
    for dir in mapped
        .iter()
        .filter(|p| file_name_starts(p, "libtorch"))
        .filter_map(|p| p.parent())
    {
        if !torch_dirs.contains(&dir) {
            torch_dirs.push(dir);
        }
    }
    for dir in torch_dirs {
        // torch/lib -> site-packages/nvidia/nccl/lib (the wheel layout), and torch/lib itself.
        let wheel = dir
            .parent()
            .and_then(Path::parent)
            .map(|site| site.join("nvidia/nccl/lib/libnccl.so.2"));
        for p in wheel.into_iter().chain([dir.join("libnccl.so.2")]) {
            if p.is_file() {
                push(Candidate {
                    target: p,
                    origin: Origin::NextToLibtorch(dir.to_path_buf()),
                });
            }
        }
    }
    for name in ["libnccl.so.2", "libnccl.so"] {
        push(Candidate {
            target: PathBuf::from(name),
            origin: Origin::System,
        });
    }
    out
}

/// The message when no candidate could be used: every place tried and why it failed, and what to do.
pub(crate) fn not_found(explicit: bool, tried: &[(Candidate, String)]) -> String {
    let mut msg = String::from("the NCCL library could not be loaded; tried ");
    if !explicit {
        msg.push_str(&format!("({ENV} is not set) "));
    }
    let list: Vec<String> = tried.iter().map(|(c, why)| format!("{c}: {why}")).collect();
    msg.push_str(&list.join("; "));
    if explicit {
        msg.push_str(&format!(
            ". {ENV} must name a loadable NCCL library (libnccl.so.2)"
        ));
    } else {
        msg.push_str(&format!(
            ". Install the torch wheel's NCCL (pip package nvidia-nccl-cu13, next to torch) or set {ENV} to the \
             path of libnccl.so.2"
        ));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not a real library").unwrap();
    }

    fn maps_line(path: &Path) -> String {
        format!(
            "7f0000000000-7f0000001000 r-xp 00000000 08:01 123456                     {}\n",
            path.display()
        )
    }

    fn targets(c: &[Candidate]) -> Vec<PathBuf> {
        c.iter().map(|c| c.target.clone()).collect()
    }

    #[test]
    fn maps_are_parsed_with_spaces_and_without_deleted_files_or_pseudo_entries() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 42    /usr/bin/m3d
7f1-7f2 r-xp 00000000 08:01 7     /opt/my venv/torch/lib/libtorch.so
7f2-7f3 r--p 00001000 08:01 7     /opt/my venv/torch/lib/libtorch.so
7f3-7f4 rw-p 00000000 00:00 0 
7f4-7f5 rw-p 00000000 00:00 0     [heap]
7f5-7f6 r-xp 00000000 08:01 9     /tmp/old/libnccl.so.2 (deleted)
";
        assert_eq!(
            mapped_files(maps),
            vec![
                PathBuf::from("/usr/bin/m3d"),
                PathBuf::from("/opt/my venv/torch/lib/libtorch.so")
            ]
        );
    }

    #[test]
    fn an_explicit_path_is_used_alone_even_if_missing() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("nvidia/nccl/lib/libnccl.so.2");
        touch(&lib);
        let maps = maps_line(&lib);
        let c = candidates(Some(OsStr::new("/nowhere/libnccl.so.2")), &maps);
        assert_eq!(
            c,
            vec![Candidate {
                target: PathBuf::from("/nowhere/libnccl.so.2"),
                origin: Origin::Explicit
            }]
        );
        // Empty means unset.
        let c = candidates(Some(OsStr::new("")), &maps);
        assert_eq!(c[0].origin, Origin::Loaded);
    }

    #[test]
    fn the_nccl_libtorch_loaded_comes_first_then_the_wheel_layout_then_the_system() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("venv/lib/python3.11/site-packages");
        let torch_lib = site.join("torch/lib");
        touch(&torch_lib.join("libtorch.so"));
        touch(&torch_lib.join("libtorch_cuda.so"));
        let wheel = site.join("nvidia/nccl/lib/libnccl.so.2");
        touch(&wheel);
        let other = dir.path().join("elsewhere/libnccl.so.2");
        touch(&other);

        // libtorch loaded, its NCCL not (yet) mapped: the wheel's file next to it, then the system names.
        let maps = maps_line(&torch_lib.join("libtorch.so"))
            + &maps_line(&torch_lib.join("libtorch_cuda.so"));
        let c = candidates(None, &maps);
        assert_eq!(
            targets(&c),
            vec![
                wheel.clone(),
                PathBuf::from("libnccl.so.2"),
                PathBuf::from("libnccl.so")
            ]
        );
        assert_eq!(c[0].origin, Origin::NextToLibtorch(torch_lib.clone()));
        assert_eq!(c[2].origin, Origin::System);

        // A NCCL mapped into the process (what libtorch_cuda loaded) comes first; the same file is not repeated.
        let maps2 = maps_line(&other) + &maps + &maps_line(&wheel);
        let c = candidates(None, &maps2);
        assert_eq!(
            targets(&c),
            vec![
                other.clone(),
                wheel.clone(),
                PathBuf::from("libnccl.so.2"),
                PathBuf::from("libnccl.so")
            ]
        );
        assert_eq!(
            (&c[0].origin, &c[1].origin),
            (&Origin::Loaded, &Origin::Loaded)
        );

        // A libnccl.so.2 inside torch/lib (other layouts) is found too, after the wheel's.
        let inside = torch_lib.join("libnccl.so.2");
        touch(&inside);
        let c = candidates(None, &maps);
        assert_eq!(targets(&c)[..2], [wheel.clone(), inside]);
    }

    #[test]
    fn without_libtorch_or_a_file_next_to_it_only_the_system_is_tried() {
        let dir = tempfile::tempdir().unwrap();
        let torch_lib = dir.path().join("site-packages/torch/lib");
        touch(&torch_lib.join("libtorch.so"));
        // No nvidia/nccl next to it.
        let c = candidates(None, &maps_line(&torch_lib.join("libtorch.so")));
        assert_eq!(
            targets(&c),
            vec![PathBuf::from("libnccl.so.2"), PathBuf::from("libnccl.so")]
        );
        let c = candidates(None, "");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_error_says_what_was_tried_and_how_to_fix_it() {
        let torch = PathBuf::from("/v/site-packages/torch/lib");
        let tried = vec![
            (
                Candidate {
                    target: PathBuf::from("/v/site-packages/nvidia/nccl/lib/libnccl.so.2"),
                    origin: Origin::NextToLibtorch(torch),
                },
                "invalid ELF header".to_string(),
            ),
            (
                Candidate {
                    target: PathBuf::from("libnccl.so.2"),
                    origin: Origin::System,
                },
                "cannot open shared object file".to_string(),
            ),
        ];
        let msg = not_found(false, &tried);
        for part in [
            "M3D_NCCL_LIB is not set",
            "/v/site-packages/nvidia/nccl/lib/libnccl.so.2 (next to libtorch in /v/site-packages/torch/lib): invalid ELF header",
            "libnccl.so.2 (dynamic linker search path): cannot open shared object file",
            "set M3D_NCCL_LIB",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
        let explicit = vec![(
            Candidate {
                target: PathBuf::from("/x/libnccl.so.2"),
                origin: Origin::Explicit,
            },
            "no such file".to_string(),
        )];
        let msg = not_found(true, &explicit);
        assert!(
            msg.contains("/x/libnccl.so.2 (from M3D_NCCL_LIB): no such file"),
            "{msg}"
        );
        assert!(!msg.contains("is not set"), "{msg}");
    }
}
