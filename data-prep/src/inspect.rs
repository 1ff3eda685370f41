//! Reading a converted dataset back for people: manifest statistics, full checksum verification, and a PNG of a
//! volume's middle slices (axial, coronal, sagittal) with its masks overlaid.

use std::collections::BTreeMap;
use std::path::Path;

use m3d_shards::dataset::ShardDataset;
use m3d_shards::encode::{decode_image_into, unpack_mask_u8_into};
use m3d_shards::schema::VolumeRecord;
use serde::Serialize;

use crate::error::{PrepError, Result};

/// What `m3d data-prep inspect` prints.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub url: String,
    pub dataset: String,
    pub schema_version: u32,
    pub created_by: String,
    pub volumes: u64,
    pub samples: u64,
    pub bytes: u64,
    pub volume_shards: usize,
    pub sample_shards: usize,
    pub bytes_per_volume: Option<f64>,
    pub skipped: u64,
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    pub preprocessing: serde_json::Value,
    /// Set when verification ran: shards and volumes checked.
    pub verified: Option<Verified>,
}

#[derive(Debug, Serialize)]
pub struct Verified {
    pub shards: usize,
    pub volumes: u64,
    /// One message per problem (sha256 mismatch naming the shard, crc mismatch naming the volume); empty when intact.
    pub failures: Vec<String>,
}

pub fn summarise(ds: &ShardDataset, url: &str, verify: bool) -> Result<Summary> {
    let m = ds.manifest();
    let vol_bytes: u64 = m.volume_shards.iter().map(|e| e.bytes).sum();
    let verified = if verify {
        let report = ds.verify()?;
        let volumes = report
            .shards
            .iter()
            .filter(|c| c.kind == m3d_shards::dataset::ShardKind::Volumes)
            .map(|c| c.rows)
            .sum();
        let failures = report
            .failures()
            .flat_map(|c| c.errors.iter().map(move |e| format!("{}: {e}", c.key)))
            .collect();
        Some(Verified {
            shards: report.shards.len(),
            volumes,
            failures,
        })
    } else {
        None
    };
    Ok(Summary {
        url: url.to_string(),
        dataset: m.dataset.clone(),
        schema_version: m.schema_version,
        created_by: m.created_by.clone(),
        volumes: m.totals.volumes,
        samples: m.totals.samples,
        bytes: m.totals.bytes,
        volume_shards: m.volume_shards.len(),
        sample_shards: m.sample_shards.len(),
        bytes_per_volume: (m.totals.volumes > 0)
            .then(|| vol_bytes as f64 / m.totals.volumes as f64),
        skipped: m.skipped,
        counts: m.counts.clone(),
        preprocessing: m.preprocessing.clone(),
        verified,
    })
}

/// Human-readable form of a summary.
pub fn render_text(s: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!("dataset        {} ({})\n", s.dataset, s.url));
    out.push_str(&format!(
        "schema         v{} by {}\n",
        s.schema_version, s.created_by
    ));
    out.push_str(&format!(
        "volumes        {} in {} shard(s){}\n",
        s.volumes,
        s.volume_shards,
        s.bytes_per_volume
            .map(|b| format!(", {:.2} MiB per volume", b / 1048576.0))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "samples        {} in {} shard(s)\n",
        s.samples, s.sample_shards
    ));
    out.push_str(&format!(
        "bytes          {} ({:.2} MiB)\n",
        s.bytes,
        s.bytes as f64 / 1048576.0
    ));
    if s.skipped > 0 {
        out.push_str(&format!(
            "skipped        {} input(s), see skipped.json\n",
            s.skipped
        ));
    }
    let splits: Vec<&String> = {
        let mut v: Vec<&String> = s.counts.values().flat_map(|m| m.keys()).collect();
        v.sort();
        v.dedup();
        v
    };
    out.push_str(&format!("\n{:<12}", "task"));
    for sp in &splits {
        out.push_str(&format!("{sp:>12}"));
    }
    out.push_str(&format!("{:>12}\n", "total"));
    let mut col_totals = vec![0u64; splits.len()];
    for (task, by_split) in &s.counts {
        out.push_str(&format!("{task:<12}"));
        let mut total = 0;
        for (i, sp) in splits.iter().enumerate() {
            let n = by_split.get(*sp).copied().unwrap_or(0);
            col_totals[i] += n;
            total += n;
            out.push_str(&format!("{n:>12}"));
        }
        out.push_str(&format!("{total:>12}\n"));
    }
    out.push_str(&format!("{:<12}", "total"));
    for n in &col_totals {
        out.push_str(&format!("{n:>12}"));
    }
    out.push_str(&format!("{:>12}\n", col_totals.iter().sum::<u64>()));
    if let Some(v) = &s.verified {
        if v.failures.is_empty() {
            out.push_str(&format!(
                "\nverified       {} shard(s), {} volume(s): every sha256 and crc32 matches\n",
                v.shards, v.volumes
            ));
        } else {
            out.push_str(&format!(
                "\nVERIFICATION FAILED ({} problem(s)):\n",
                v.failures.len()
            ));
            for f in &v.failures {
                out.push_str(&format!("  {f}\n"));
            }
        }
    }
    out
}

/// Finds a volume by id, or the volume of sample number `sample`, or else the first volume.
pub fn find_volume(
    ds: &ShardDataset,
    volume_id: Option<&str>,
    sample: Option<usize>,
) -> Result<VolumeRecord> {
    let wanted: Option<String> = match (volume_id, sample) {
        (Some(id), _) => Some(id.to_string()),
        (None, Some(i)) => Some(
            ds.samples()
                .get(i)
                .ok_or_else(|| {
                    PrepError::Options(format!(
                        "sample {i} out of range ({} samples)",
                        ds.samples().len()
                    ))
                })?
                .volume_id
                .clone(),
        ),
        (None, None) => None,
    };
    let found = match &wanted {
        Some(id) => ds.find_volume(id)?,
        None if ds.manifest().volume_shards.is_empty() => None,
        None => ds.stream_volumes(0)?.next().transpose()?,
    };
    if let Some(rec) = found {
        return Ok(rec);
    }
    Err(PrepError::Options(match wanted {
        Some(w) => format!("volume {w:?} is not in this dataset (VQA samples reference M3D-Cap volumes: render those from the Cap dataset)"),
        None => "the dataset holds no volumes".to_string(),
    }))
}

const PALETTE: [[u8; 3]; 6] = [
    [230, 40, 40],
    [40, 200, 60],
    [50, 110, 240],
    [240, 200, 30],
    [200, 60, 220],
    [30, 210, 210],
];

/// Renders the middle axial, coronal and sagittal slices side by side (each 256 x 256, depth stretched), masks
/// overlaid in colour at 50 %.
pub fn render_png(rec: &VolumeRecord, out: &Path) -> Result<()> {
    let [c, d, h, w] = rec.shape.map(|v| v as usize);
    if c != 1 || d == 0 || h == 0 || w == 0 {
        return Err(PrepError::Options(format!(
            "cannot render shape {:?}",
            rec.shape
        )));
    }
    let mut img = vec![0f32; d * h * w];
    decode_image_into(&rec.image, rec.dtype, &mut img)?;
    let mut masks: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, m) in rec.masks.iter().enumerate() {
        if m.voxels > 0 {
            let mut buf = vec![0u8; d * h * w];
            unpack_mask_u8_into(&m.bits, &mut buf)?;
            masks.push((i, buf));
        }
    }
    let side = 256usize;
    let mut canvas = image::RgbImage::new((side * 3) as u32, side as u32);
    // Each panel maps its pixel (row, col) to a voxel index.
    let panels: [Box<dyn Fn(usize, usize) -> usize>; 3] = [
        Box::new(|r, col| ((d / 2) * h + r * h / side) * w + col * w / side),
        Box::new(|r, col| ((r * d / side) * h + h / 2) * w + col * w / side),
        Box::new(|r, col| ((r * d / side) * h + col * h / side) * w + w / 2),
    ];
    for (p, index) in panels.iter().enumerate() {
        for r in 0..side {
            for col in 0..side {
                let i = index(r, col);
                let g = (img[i].clamp(0.0, 1.0) * 255.0).round();
                let mut px = [g, g, g];
                for (k, m) in &masks {
                    if m[i] != 0 {
                        let colour = PALETTE[k % PALETTE.len()];
                        for ch in 0..3 {
                            px[ch] = 0.5 * px[ch] + 0.5 * colour[ch] as f32;
                        }
                    }
                }
                canvas.put_pixel(
                    (p * side + col) as u32,
                    r as u32,
                    image::Rgb(px.map(|v| v as u8)),
                );
            }
        }
    }
    canvas
        .save(out)
        .map_err(|e| PrepError::input(out, format!("cannot write PNG: {e}")))
}
