//! The compact binary form of a [`SampleRecord`]: fields back to back, lengths as varints, absent fields as
//! one byte. The worker's in-memory sample table (`m3d_data::samples`) and the stored sample lookup
//! ([`crate::lookup`]) both keep records in this form, in zstd-compressed blocks.

use crate::schema::{SampleRecord, Task};

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn get_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first()?;
        *rest = tail;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// An optional string: 0 when absent, else its length + 1, then its bytes.
fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_varint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn get_str(rest: &mut &[u8]) -> Option<Option<String>> {
    let n = get_varint(rest)?;
    if n == 0 {
        return Some(None);
    }
    let n = usize::try_from(n - 1).ok()?;
    if rest.len() < n {
        return None;
    }
    let (s, tail) = rest.split_at(n);
    *rest = tail;
    String::from_utf8(s.to_vec()).ok().map(Some)
}

fn put_u32(out: &mut Vec<u8>, v: Option<u32>) {
    put_varint(out, v.map_or(0, |v| u64::from(v) + 1));
}

fn get_u32(rest: &mut &[u8]) -> Option<Option<u32>> {
    match get_varint(rest)? {
        0 => Some(None),
        n => u32::try_from(n - 1).ok().map(Some),
    }
}

/// Appends `r` to `out`.
pub fn encode_record(out: &mut Vec<u8>, r: &SampleRecord) {
    for s in [&r.sample_id, &r.dataset, &r.split, &r.volume_id] {
        put_str(out, Some(s));
    }
    for s in [
        &r.question,
        &r.answer,
        &r.answer_choice,
        &r.question_type,
        &r.class_name,
        &r.report,
        &r.source_row,
    ] {
        put_str(out, s.as_deref());
    }
    // Task::ALL holds every task, so the position always exists.
    let task = Task::ALL.iter().position(|t| *t == r.task).unwrap_or(0);
    out.push(task as u8);
    put_u32(out, r.mask_index);
    match &r.bbox {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            for v in b {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Decodes the record at the front of `rest` and advances past it; `None` when the bytes are not a record.
pub fn decode_record(rest: &mut &[u8]) -> Option<SampleRecord> {
    let mut req = || get_str(rest).flatten();
    let (sample_id, dataset, split, volume_id) = (req()?, req()?, req()?, req()?);
    let mut opt = || get_str(rest);
    let (question, answer, answer_choice, question_type, class_name, report, source_row) =
        (opt()?, opt()?, opt()?, opt()?, opt()?, opt()?, opt()?);
    let (&task, tail) = rest.split_first()?;
    *rest = tail;
    let task = *Task::ALL.get(usize::from(task))?;
    let mask_index = get_u32(rest)?;
    let (&has_bbox, tail) = rest.split_first()?;
    *rest = tail;
    let bbox = if has_bbox == 1 {
        if rest.len() < 24 {
            return None;
        }
        let (b, tail) = rest.split_at(24);
        *rest = tail;
        let mut out = [0f32; 6];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Some(out)
    } else {
        None
    };
    Some(SampleRecord {
        sample_id,
        dataset,
        task,
        split,
        volume_id,
        mask_index,
        question,
        answer,
        answer_choice,
        question_type,
        class_name,
        bbox,
        report,
        source_row,
    })
}

/// Advances `rest` past one record without decoding its strings.
pub fn skip_record(rest: &mut &[u8]) -> Option<()> {
    for _ in 0..11 {
        let n = get_varint(rest)?;
        let n = usize::try_from(n.saturating_sub(1)).ok()?;
        *rest = rest.get(n..)?;
    }
    // Task byte, mask index, bbox flag (+ 24 bytes).
    *rest = rest.get(1..)?;
    get_varint(rest)?;
    let (&has_bbox, tail) = rest.split_first()?;
    *rest = if has_bbox == 1 { tail.get(24..)? } else { tail };
    Some(())
}
