//! `m3d_data_prep::text::unidecode` against Python's `unidecode` (package `Unidecode`, the version pinned in
//! scripts/requirements.txt), which HEAD's `m3d_cap_data_prepare.py` applies to series folder names: every code
//! point of `UNIDECODE_VERIFIED` must transliterate identically. Differences outside those ranges are counted
//! and printed, not failed (see the docs of `unidecode`).

use std::process::Command;

use m3d_data_prep::text::{unidecode, UNIDECODE_VERIFIED, UNIDECODE_VERSION};

const SCRIPT: &str = r#"
import json, sys
from importlib.metadata import version
from unidecode import unidecode
ranges = json.loads(sys.argv[1])
out = {"version": version("Unidecode"), "map": {}}
for lo, hi in ranges:
    for cp in range(lo, hi + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        out["map"][cp] = unidecode(chr(cp))
print(json.dumps(out))
"#;

/// Python's `unidecode(chr(cp))` for every code point of `ranges` (inclusive), and the package version.
fn python_unidecode(ranges: &[(u32, u32)]) -> (String, Vec<(u32, String)>) {
    let arg = serde_json::to_string(ranges).unwrap();
    let out = Command::new(m3d_testkit::python())
        .args(["-c", SCRIPT, &arg])
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "python unidecode oracle failed (is Unidecode=={UNIDECODE_VERSION} installed? scripts/setup.sh)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut map: Vec<(u32, String)> = v["map"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.parse().unwrap(), s.as_str().unwrap().to_string()))
        .collect();
    map.sort();
    (v["version"].as_str().unwrap().to_string(), map)
}

fn ours(cp: u32) -> String {
    unidecode(&char::from_u32(cp).unwrap().to_string())
}

#[test]
fn unidecode_equals_python_unidecode_on_the_verified_ranges() {
    let (version, map) = python_unidecode(&UNIDECODE_VERIFIED);
    assert_eq!(
        version, UNIDECODE_VERSION,
        "the oracle's Unidecode is not the version the table was checked against"
    );
    let expected: usize = UNIDECODE_VERIFIED
        .iter()
        .map(|(lo, hi)| (hi - lo + 1) as usize)
        .sum();
    assert_eq!(map.len(), expected);
    let bad: Vec<String> = map
        .iter()
        .filter(|(cp, want)| ours(*cp) != *want)
        .map(|(cp, want)| format!("('\\u{{{cp:04x}}}', {want:?}), // ours {:?}", ours(*cp)))
        .collect();
    assert!(
        bad.is_empty(),
        "{} code points differ from Python's unidecode {version}; entries for UNIDECODE_FIXES:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // Whole folder names, as the Cap converter applies it.
    for name in [
        "Axial_Pöschl_C__arterial_phase",
        "Straße_Øre_Æ_Łódź_Ħ_ŉ_ſ",
        "Coronal_½_µ_°_–_≤",
    ] {
        let (_, per_char) = python_unidecode(
            &name
                .chars()
                .map(|c| (u32::from(c), u32::from(c)))
                .collect::<Vec<_>>(),
        );
        let want: String = name
            .chars()
            .map(|c| {
                per_char
                    .iter()
                    .find(|(cp, _)| *cp == u32::from(c))
                    .unwrap()
                    .1
                    .clone()
            })
            .collect();
        assert_eq!(unidecode(name), want, "{name}");
    }
}

/// Not a requirement: how far the crate's tables are from Python's elsewhere in the BMP (printed with
/// `--nocapture`), so that widening `UNIDECODE_VERIFIED` can be judged.
#[test]
fn unidecode_differences_outside_the_verified_ranges_are_reported() {
    let (_, map) = python_unidecode(&[(0x0530, 0xFFFF)]);
    let verified = |cp: u32| {
        UNIDECODE_VERIFIED
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&cp))
    };
    let mut per_block: std::collections::BTreeMap<u32, usize> = Default::default();
    for (cp, want) in &map {
        if !verified(*cp) && ours(*cp) != *want {
            *per_block.entry(cp & !0xFF).or_default() += 1;
        }
    }
    let total: usize = per_block.values().sum();
    eprintln!("code points in U+0530..U+FFFF outside the verified ranges that differ from Python: {total}");
    for (block, n) in &per_block {
        eprintln!("  U+{block:04X}..U+{:04X}: {n}", block + 0xFF);
    }
    assert!(total < map.len());
}
