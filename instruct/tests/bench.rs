//! M3D-Bench prompts on hand-built samples: the exact strings the reference's evaluation builds (expected values
//! written from Bench/dataset/multi_dataset.py and Bench/dataset/prompt_templates.py at 63e72005), the per-sample
//! template draws, and the errors for samples a task cannot use.

use std::collections::BTreeSet;

use m3d_instruct::bench::{
    bench_prompts, bench_templates, prompt_from_draws, prompt_rng, BenchPrompt, BenchTask, Draws,
    REFERENCE_IMAGE_TOKEN, REFERENCE_IMAGE_TOKENS,
};
use m3d_instruct::{Family, InstructError};
use m3d_shards::schema::{SampleRecord, Task};
use rand::Rng;

const TOK: &str = "<im_patch>";

fn sample(id: &str, task: Task) -> SampleRecord {
    SampleRecord {
        sample_id: id.into(),
        dataset: "seg".into(),
        task,
        split: "test".into(),
        volume_id: "0003/case_00001".into(),
        mask_index: None,
        question: None,
        answer: None,
        answer_choice: None,
        question_type: None,
        class_name: None,
        bbox: None,
        report: None,
        source_row: None,
    }
}

fn caption(id: &str) -> SampleRecord {
    SampleRecord {
        dataset: "cap".into(),
        volume_id: "ct_case/000006/Axial".into(),
        report: Some("Findings: the liver is enlarged. \n".into()),
        ..sample(id, Task::Caption)
    }
}

/// Closed VQA as m3d-data-prep stores it (`vqa::closed_prompt`).
fn vqa_closed(id: &str) -> SampleRecord {
    SampleRecord {
        dataset: "vqa".into(),
        question: Some(
            "Which organ is enlarged? Choices: A. Liver B. Spleen C. Left kidney D. None of the above"
                .into(),
        ),
        answer: Some("A. Liver".into()),
        answer_choice: Some("A".into()),
        question_type: Some("4".into()),
        ..sample(id, Task::VqaClosed)
    }
}

fn vqa_open(id: &str) -> SampleRecord {
    SampleRecord {
        dataset: "vqa".into(),
        question: Some("Which organ is enlarged?".into()),
        answer: Some("Liver".into()),
        answer_choice: Some("A".into()),
        question_type: Some("4".into()),
        ..sample(id, Task::VqaOpen)
    }
}

/// A mask sample of M3D-Seg dataset 0003 (reference classes liver, kidney, spleen, pancreas), channel 1.
fn mask(id: &str, task: Task) -> SampleRecord {
    SampleRecord {
        mask_index: Some(1),
        class_name: Some("kidney".into()),
        bbox: (task != Task::Seg).then_some([0.062, 0.2, 0.0, 0.5, 0.906, 1.0]),
        ..sample(id, task)
    }
}

fn refseg_row(id: &str) -> SampleRecord {
    SampleRecord {
        dataset: "refseg".into(),
        volume_id: "s0001".into(),
        mask_index: Some(0),
        question: Some("Where is the lesion in the right lobe? Please segment it.".into()),
        answer: Some("It is [SEG].".into()),
        question_type: Some("1".into()),
        ..sample(id, Task::RefSeg)
    }
}

fn tokens(n: usize) -> String {
    TOK.repeat(n)
}

fn draws(question: usize, term: Option<usize>, answer: Option<usize>) -> Draws {
    Draws {
        question: Some(question),
        term,
        answer,
    }
}

fn rebuild(
    task: BenchTask,
    family: Option<Family>,
    s: &SampleRecord,
    d: Draws,
) -> Result<BenchPrompt, InstructError> {
    prompt_from_draws(task, family, s, 3, TOK, d)
}

const BOX: &str = "<bx_start>[0.062, 0.2, 0.0, 0.5, 0.906, 1.0]<bx_end>";
const KIDNEY_0: &str = "Organ responsible for filtering blood and producing urine.";

#[test]
fn task_names_round_trip() {
    let names = [
        "cap",
        "vqa-closed",
        "vqa-open",
        "rec",
        "reg",
        "seg",
        "refseg",
        "retrieval",
    ];
    for (t, name) in BenchTask::ALL.into_iter().zip(names) {
        assert_eq!(t.to_string(), name);
        assert_eq!(name.parse::<BenchTask>().unwrap(), t);
        assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{name}\""));
    }
    let e = "vqa_closed".parse::<BenchTask>().unwrap_err().to_string();
    assert!(e.contains("vqa_closed") && e.contains("vqa-closed"), "{e}");
}

#[test]
fn templates_are_the_reference_lists() {
    let t = bench_templates().unwrap();
    assert_eq!(t.provenance.repository, "https://github.com/BAAI-DCAI/M3D");
    assert_eq!(
        t.provenance.commit,
        "63e72005a2304eda74579870239bfc7b04b0edae"
    );
    assert_eq!(t.caption.len(), 42);
    assert_eq!(
        (t.rec.cls_questions.len(), t.rec.des_questions.len()),
        (19, 41)
    );
    assert_eq!((t.rec.cls_answers.len(), t.rec.des_answers.len()), (32, 21));
    assert_eq!(
        (t.reg.cls_questions.len(), t.reg.des_questions.len()),
        (36, 17)
    );
    assert_eq!((t.reg.cls_answers.len(), t.reg.des_answers.len()), (20, 18));
    assert_eq!(
        (t.seg.cls_questions.len(), t.seg.des_questions.len()),
        (26, 21)
    );
    assert_eq!((t.seg.cls_answers.len(), t.seg.des_answers.len()), (13, 12));
    assert_eq!(t.term_dict.len(), 223);
    assert_eq!(
        t.dataset_info["0003"],
        ["liver", "kidney", "spleen", "pancreas"]
    );
    assert_eq!(t.term_dict["kidney"][0], KIDNEY_0);
    // The duplicate is the reference's: random.choice picks this caption twice as often.
    assert_eq!(t.caption[2], t.caption[13]);
    assert_eq!(
        t.eval_datasets["rec"].tags.as_deref(),
        Some(&["0003".to_string()][..])
    );
    assert_eq!(
        (REFERENCE_IMAGE_TOKEN, REFERENCE_IMAGE_TOKENS),
        ("<im_patch>", 256)
    );
}

#[test]
fn caption_prompt_glues_the_image_tokens_to_the_question() {
    let p = rebuild(BenchTask::Cap, None, &caption("c1"), draws(0, None, None)).unwrap();
    assert_eq!(
        p.prompt,
        format!(
            "{}Can you provide a caption consists of findings for this medical image?",
            tokens(3)
        )
    );
    assert_eq!(
        p.question,
        "Can you provide a caption consists of findings for this medical image?"
    );
    // The report as read from its file, unstripped (the eval strips both sides before scoring).
    assert_eq!(p.answer, "Findings: the liver is enlarged. \n");
    assert_eq!(
        (p.question_type.as_str(), p.construction, p.family),
        ("Caption", "CapDataset", None)
    );
    let last = rebuild(BenchTask::Cap, None, &caption("c1"), draws(41, None, None)).unwrap();
    assert_eq!(
        last.prompt,
        format!(
            "{}Can you provide a diagnosis based on this image?",
            tokens(3)
        )
    );
}

#[test]
fn closed_vqa_lists_the_choices_after_one_space() {
    let p = rebuild(
        BenchTask::VqaClosed,
        None,
        &vqa_closed("v1"),
        Draws::default(),
    )
    .unwrap();
    assert_eq!(
        p.prompt,
        format!(
            "{} Which organ is enlarged? Choices: A. Liver B. Spleen C. Left kidney D. None of the above",
            tokens(3)
        )
    );
    assert_eq!(p.answer, "A. Liver");
    assert_eq!(p.answer_choice.as_deref(), Some("A"));
    assert_eq!(p.question_type, "4");
    assert_eq!(p.template_index(), None);
    let full = bench_prompts(BenchTask::VqaClosed, &vqa_closed("v1"), 256, TOK, 0).unwrap();
    assert_eq!(full.len(), 1);
    assert_eq!(
        full[0].prompt,
        format!("{} {}", tokens(256), vqa_closed("v1").question.unwrap())
    );
}

#[test]
fn open_vqa_is_question_and_answer_text() {
    let p = &bench_prompts(BenchTask::VqaOpen, &vqa_open("v2"), 2, TOK, 9).unwrap()[0];
    assert_eq!(p.prompt, "<im_patch><im_patch> Which organ is enlarged?");
    assert_eq!(p.answer, "Liver");
    assert_eq!(p.answer_choice, None);
    assert_eq!(p.question_type, "4");
}

#[test]
fn rec_words_the_class_or_its_description_and_answers_with_the_box() {
    let s = mask("seg/0003/case_00001/rec/1", Task::Rec);
    let cls = rebuild(
        BenchTask::Rec,
        Some(Family::Cls),
        &s,
        draws(0, None, Some(0)),
    )
    .unwrap();
    assert_eq!(
        cls.prompt,
        format!(
            "{} Can you find the kidney in this image? Give coordinates.",
            tokens(3)
        )
    );
    assert_eq!(cls.answer, format!("Coordinates are {BOX}."));
    assert_eq!(cls.bbox, Some([0.062, 0.2, 0.0, 0.5, 0.906, 1.0]));
    assert_eq!(
        (cls.question_type.as_str(), cls.class_name.as_deref()),
        ("REC", Some("kidney"))
    );
    let des = rebuild(
        BenchTask::Rec,
        Some(Family::Des),
        &s,
        draws(0, Some(0), Some(0)),
    )
    .unwrap();
    assert_eq!(
        des.prompt,
        format!(
            "{} Description: {KIDNEY_0} Please answer and find it by box based on the above description.",
            tokens(3)
        )
    );
    assert_eq!(
        des.answer,
        format!("The target is kidney and the coordinates is {BOX}.")
    );
    // "{}, {}" has no full stop: verbatim.
    let bare = rebuild(
        BenchTask::Rec,
        Some(Family::Des),
        &s,
        draws(9, Some(0), Some(3)),
    )
    .unwrap();
    assert_eq!(
        bare.question,
        format!("{KIDNEY_0} Please answer and find it by box based on the above description.")
    );
    assert_eq!(bare.answer, format!("kidney, {BOX}"));
    // Both phrasings are evaluated, class name first.
    let both = bench_prompts(BenchTask::Rec, &s, 3, TOK, 1).unwrap();
    let fams: Vec<_> = both.iter().map(|p| p.family).collect();
    assert_eq!(fams, [Some(Family::Cls), Some(Family::Des)]);
}

#[test]
fn reg_shows_the_box_and_answers_with_the_class() {
    let s = mask("seg/0003/case_00001/reg/1", Task::Reg);
    let cls = rebuild(
        BenchTask::Reg,
        Some(Family::Cls),
        &s,
        draws(0, None, Some(0)),
    )
    .unwrap();
    // The space before "?" is in the reference template.
    assert_eq!(
        cls.prompt,
        format!(
            "{} What target is present within the coordinates {BOX} ?",
            tokens(3)
        )
    );
    assert_eq!(cls.answer, "The target is kidney.");
    assert_eq!(cls.question_type, "REG");
    let des = rebuild(
        BenchTask::Reg,
        Some(Family::Des),
        &s,
        draws(0, Some(0), Some(0)),
    )
    .unwrap();
    assert_eq!(
        des.question,
        format!("Please describe the target and its function based on the box {BOX} in the image.")
    );
    assert_eq!(des.answer, format!("Sure, it is kidney. {KIDNEY_0}"));
}

#[test]
fn seg_names_the_class_and_refseg_describes_it() {
    let s = mask("seg/0003/case_00001/seg/1", Task::Seg);
    let seg = rebuild(
        BenchTask::Seg,
        Some(Family::Cls),
        &s,
        draws(0, None, Some(0)),
    )
    .unwrap();
    assert_eq!(
        seg.prompt,
        format!("{} Can you segment the kidney in this image?", tokens(3))
    );
    assert_eq!(seg.answer, "It is [SEG].");
    assert_eq!((seg.question_type.as_str(), seg.bbox), ("seg", None));
    let res = rebuild(
        BenchTask::RefSeg,
        Some(Family::Des),
        &s,
        draws(0, Some(0), Some(0)),
    )
    .unwrap();
    assert_eq!(
        res.prompt,
        format!("{} {KIDNEY_0} Please answer and segment.", tokens(3))
    );
    assert_eq!(
        res.answer,
        "The target is kidney and the segmentation mask is [SEG]."
    );
    assert_eq!(res.construction, "SegDataset(description=True)");
    let row = &bench_prompts(BenchTask::RefSeg, &refseg_row("r1"), 3, TOK, 0).unwrap()[0];
    assert_eq!(
        row.prompt,
        format!(
            "{} Where is the lesion in the right lobe? Please segment it.",
            tokens(3)
        )
    );
    assert_eq!(row.answer, "It is [SEG].");
    assert_eq!(
        (row.construction, row.question_type.as_str()),
        ("RefSegDataset", "refseg")
    );
}

#[test]
fn the_reference_class_list_names_the_class() {
    // Reference prompts use dataset_info[tag][channel], whatever the converted label says.
    let mut s = mask("m", Task::Seg);
    s.class_name = Some("kidneys (label json)".into());
    let p = rebuild(
        BenchTask::Seg,
        Some(Family::Cls),
        &s,
        draws(2, None, Some(0)),
    )
    .unwrap();
    assert_eq!(p.question, "Please segment the kidney in this image.");
    // A dataset code the reference does not list falls back to the sample's class.
    s.volume_id = "9999/case".into();
    s.class_name = Some("liver".into());
    let p = rebuild(
        BenchTask::Seg,
        Some(Family::Cls),
        &s,
        draws(2, None, Some(0)),
    )
    .unwrap();
    assert_eq!(p.question, "Please segment the liver in this image.");
    // A channel past the reference's list: not the reference's dataset (synthetic data reuses its codes), so the
    // sample's own class; without one, an error naming the channel.
    s.mask_index = Some(4);
    s.volume_id = "0003/case".into();
    let p = rebuild(
        BenchTask::Seg,
        Some(Family::Cls),
        &s,
        draws(2, None, Some(0)),
    )
    .unwrap();
    assert_eq!(p.question, "Please segment the liver in this image.");
    s.class_name = None;
    let e = rebuild(
        BenchTask::Seg,
        Some(Family::Cls),
        &s,
        draws(2, None, Some(0)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sample m") && e.contains("mask_index 4"), "{e}");
}

#[test]
fn the_same_seed_gives_the_same_templates_and_ids_spread_over_them() {
    let prompts = |seed: u64| -> Vec<BenchPrompt> {
        (0..300)
            .map(|i| {
                bench_prompts(
                    BenchTask::Cap,
                    &caption(&format!("cap/test/{i}")),
                    1,
                    TOK,
                    seed,
                )
            })
            .map(|r| r.unwrap().remove(0))
            .collect()
    };
    let a = prompts(7);
    assert_eq!(a, prompts(7));
    // Order- and split-independent: a sample's prompt does not depend on which others are built.
    let alone = bench_prompts(BenchTask::Cap, &caption("cap/test/123"), 1, TOK, 7).unwrap();
    assert_eq!(alone[0], a[123]);
    let used: BTreeSet<usize> = a.iter().filter_map(BenchPrompt::template_index).collect();
    assert!(
        used.len() >= 38,
        "300 samples used only {} of 42 templates",
        used.len()
    );
    let other = prompts(8);
    let moved = a
        .iter()
        .zip(&other)
        .filter(|(x, y)| x.draws != y.draws)
        .count();
    assert!(moved > 250, "a new seed changed only {moved} of 300 draws");
    // Each prompt is what its recorded draws rebuild.
    for p in a.iter().take(20) {
        let again = prompt_from_draws(
            BenchTask::Cap,
            None,
            &caption(&p.sample_id),
            1,
            TOK,
            p.draws,
        )
        .unwrap();
        assert_eq!(&again, p);
    }
}

#[test]
fn the_draws_are_pinned() {
    // Guards the documented stream (SHA-256 seed, ChaCha8, u64 ranges) against silent dependency changes.
    let mut rng = prompt_rng(
        42,
        BenchTask::Rec,
        Some(Family::Des),
        "seg/0003/case_00001/rec/1",
    );
    let first: Vec<u64> = (0..4).map(|_| rng.random_range(0..1000u64)).collect();
    let s = mask("seg/0003/case_00001/rec/1", Task::Rec);
    let p = bench_prompts(BenchTask::Rec, &s, 1, TOK, 42).unwrap();
    assert_eq!(first, [460, 254, 345, 181]);
    assert_eq!(p[0].draws, draws(7, None, Some(21)));
    assert_eq!(p[1].draws, draws(18, Some(5), Some(7)));
}

#[test]
fn rec_halves_and_seg_refseg_draw_independently() {
    let differs = |a: &BenchPrompt, b: &BenchPrompt| a.draws.question != b.draws.question;
    let n = (0..100)
        .filter(|i| {
            let s = mask(&format!("m{i}"), Task::Seg);
            let seg = bench_prompts(BenchTask::Seg, &s, 1, TOK, 0).unwrap();
            let res = bench_prompts(BenchTask::RefSeg, &s, 1, TOK, 0).unwrap();
            differs(&seg[0], &res[0])
        })
        .count();
    assert!(n > 80, "{n}");
}

fn err(r: Result<Vec<BenchPrompt>, InstructError>) -> String {
    match r {
        Err(e @ InstructError::Sample { .. }) => e.to_string(),
        other => panic!("expected a sample error, got {other:?}"),
    }
}

#[test]
fn missing_fields_are_errors_naming_sample_and_field() {
    let mut c = caption("cap/test/9");
    c.report = None;
    let e = err(bench_prompts(BenchTask::Cap, &c, 1, TOK, 0));
    assert!(
        e.contains("sample cap/test/9") && e.contains("`report`"),
        "{e}"
    );

    let mut v = vqa_closed("vqa/test/3");
    v.answer_choice = None;
    let e = err(bench_prompts(BenchTask::VqaClosed, &v, 1, TOK, 0));
    assert!(
        e.contains("vqa/test/3") && e.contains("`answer_choice`"),
        "{e}"
    );

    let mut v = vqa_open("vqa/test/4");
    v.question_type = None;
    let e = err(bench_prompts(BenchTask::VqaOpen, &v, 1, TOK, 0));
    assert!(
        e.contains("vqa/test/4") && e.contains("`question_type`"),
        "{e}"
    );

    let mut r = mask("rec/1", Task::Rec);
    r.bbox = None;
    let e = err(bench_prompts(BenchTask::Rec, &r, 1, TOK, 0));
    assert!(e.contains("rec/1") && e.contains("`bbox`"), "{e}");

    let mut s = mask("seg/1", Task::Seg);
    s.mask_index = None;
    let e = err(bench_prompts(BenchTask::Seg, &s, 1, TOK, 0));
    assert!(e.contains("seg/1") && e.contains("`mask_index`"), "{e}");

    let mut s = mask("seg/2", Task::Seg);
    s.volume_id = "other/case".into();
    s.class_name = None;
    let e = err(bench_prompts(BenchTask::RefSeg, &s, 1, TOK, 0));
    assert!(e.contains("seg/2") && e.contains("`class_name`"), "{e}");

    let mut s = mask("seg/3", Task::Seg);
    s.volume_id = "other/case".into();
    s.class_name = Some("unobtainium".into());
    let e = err(bench_prompts(BenchTask::RefSeg, &s, 1, TOK, 0));
    assert!(e.contains("seg/3") && e.contains("term_dict"), "{e}");

    let mut q = refseg_row("refseg/7");
    q.answer = None;
    let e = err(bench_prompts(BenchTask::RefSeg, &q, 1, TOK, 0));
    assert!(e.contains("refseg/7") && e.contains("`answer`"), "{e}");
}

#[test]
fn malformed_or_mismatched_samples_are_errors() {
    let mut v = vqa_closed("v");
    v.question = Some("Which organ is enlarged?".into());
    assert!(err(bench_prompts(BenchTask::VqaClosed, &v, 1, TOK, 0)).contains("Choices"));
    let mut v = vqa_closed("v");
    v.answer = Some("B. Spleen".into());
    assert!(err(bench_prompts(BenchTask::VqaClosed, &v, 1, TOK, 0)).contains("answer_choice"));
    let e = err(bench_prompts(
        BenchTask::VqaClosed,
        &vqa_open("v9"),
        1,
        TOK,
        0,
    ));
    assert!(
        e.contains("v9") && e.contains("vqa_open sample") && e.contains("vqa-closed"),
        "{e}"
    );
    let e = err(bench_prompts(
        BenchTask::Retrieval,
        &caption("c"),
        1,
        TOK,
        0,
    ));
    assert!(e.contains("no prompt"), "{e}");
    let s = mask("r", Task::Rec);
    assert!(rebuild(BenchTask::Rec, None, &s, draws(0, None, Some(0)))
        .unwrap_err()
        .to_string()
        .contains("phrasing"));
    let e = rebuild(
        BenchTask::Rec,
        Some(Family::Cls),
        &s,
        draws(19, None, Some(0)),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("question template draw 19 is out of range"),
        "{e}"
    );
    let e = rebuild(
        BenchTask::Rec,
        Some(Family::Cls),
        &s,
        draws(1, Some(0), Some(0)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("draws no term_dict phrase"), "{e}");
    let e = rebuild(
        BenchTask::Rec,
        Some(Family::Des),
        &s,
        draws(1, None, Some(0)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("none was given"), "{e}");
}
