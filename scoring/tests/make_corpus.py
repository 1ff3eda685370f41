#!/usr/bin/env python3
"""Writes tests/data/corpus.jsonl, the fixed (prediction, references) corpus on which m3d-scoring's text
metrics are compared with sacrebleu, rouge-score and NLTK (tests/oracle.rs).

Deterministic: hand-written edge cases first, then report-style pairs from a seeded generator. The output is
committed; rerun this only to change the corpus:  python3 scoring/tests/make_corpus.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "corpus.jsonl"

# (prediction, references) pairs aimed at one tokenizer, stemmer or matcher rule each.
EDGE_CASES = [
    # Empty and blank sides (BLEU divides by zero on these in the reference).
    ("", ["The liver is normal."]),
    ("The liver is normal.", [""]),
    ("", [""]),
    ("   ", ["No acute findings."]),
    ("No acute findings.", ["\t\n "]),
    ("\u001c\u001f", ["separator only"]),
    # HTML entities and sacrebleu's special strings.
    ("Size &lt; 3 cm &amp; stable &quot;unchanged&quot; &gt; 2019", ['Size < 3 cm & stable "unchanged" > 2019']),
    ("&amp;quot; double &amp;amp; escaped &apos;x&apos;", ['&quot; double &amp; escaped \'x\'']),
    ("<skipped> well-\nknown cyst-\nlike lesion", ["well-known cyst-like lesion"]),
    # Numbers, units, percentages, dates.
    ("Lesion measuring 3.5cm x 2.1 cm, 10% larger since 2023-05-14.", ["A 3.5 cm lesion (10 %) was seen on 14/05/2023."]),
    ("Cost $3.88 or 1,000.50 euros; -3 and +4 and .5 and 3.", ["$ 3.88, 1000.50, -3, +4, 0.5, 3"]),
    ("The 2nd and 3rd vertebrae, 12-15 mm apart, 0.8cm x 1.1cm.", ["Second and third vertebrae are 12 to 15 mm apart."]),
    ("Follow-up on 01/02/2024 at 10:30, i.e. 3 months.", ["Follow up in 3 months (2024-02-01 10:30)."]),
    # Accents, decomposed accents, CJK, emoji, other scripts, Kelvin sign, final sigma.
    ("Hépatomégalie modérée, pas de lésion focale.", ["Hepatomegalie moderee sans lesion focale."]),
    ("cafe\u0301 and naïve re\u0301sume\u0301", ["café and naive résumé"]),
    ("肝脏大小正常。未见明显异常。", ["肝脏大小正常，未见异常。"]),
    ("Normal scan 👍 no lesion 🙂.", ["Normal scan, no lesion."]),
    ("Temperature 300\u212a, ΟΔΟΣ ΣΊΣΥΦΟΣ", ["temperature 300k, οδος σισυφος"]),
    ("Печень не увеличена. Селезенка норма.", ["Печень нормальных размеров."]),
    ("x\u00b2 + y\u00b3 = \u00bd area\u2082", ["x2 + y3 = half area"]),
    ("Ａｂｄｏｍｅｎ ＣＴ ｓｃａｎ", ["Abdomen CT scan"]),
    # Repeated words.
    ("the the the liver liver liver is is normal normal", ["the liver is normal"]),
    ("liver", ["liver liver liver liver"]),
    ("normal normal normal", ["normal"]),
    # Inflections for the stemmer.
    ("Enlarged kidneys were identified bilaterally.", ["Enlarging kidney is identified bilateral."]),
    ("The lesions are growing and spreading rapidly.", ["A lesion grew and spread rapidly."]),
    ("Multiple calcifications, calcified nodules, calcifying masses.", ["Calcification of a nodule and a calcified mass."]),
    ("relational generalization electrical adjustment controlling hopping", ["relate general electric adjust control hop"]),
    ("studies studied studying dying lying tying skies news innings", ["study die lie tie sky news inning"]),
    ("happily happiness happier happiest conditional", ["happy happy happy happy condition"]),
    ("agreed feed proceeding exceeded succeeding", ["agree feeds proceed exceed succeed"]),
    ("fully carefully radiologically hopefulness", ["full careful radiology hopeful"]),
    ("ies ied cries cried ponies caresses", ["cry cry pony caress ie"]),
    # Synonyms for WordNet.
    ("The liver is big.", ["The liver is large."]),
    ("A small renal mass is seen.", ["A little kidney tumor is observed."]),
    ("Normal picture of the abdomen.", ["Regular image of the belly."]),
    ("The scan demonstrates a lump.", ["The scan shows a mass."]),
    ("Begin treatment quickly.", ["Start therapy fast."]),
    ("The heart looks huge and the aorta is wide.", ["The heart appears enormous and the aorta is broad."]),
    ("No sign of illness.", ["No evidence of disease."]),
    ("Kidney stones present.", ["Renal calculi are present."]),
    # Punctuation, quotes, brackets, dashes, ellipses.
    ("(Right) kidney: normal; left -- atrophic! Really?", ["Right kidney normal, left atrophic."]),
    ('He said "no" and \'maybe\' then ``yes\'\'.', ["He said no, maybe, then yes."]),
    ("“Curly” quotes ‘single’ «guillemets» — em–en dash…", ['"Curly" quotes \'single\' <guillemets> - em-en dash...']),
    ("Unclear... possibly a cyst. . . or not.", ["Unclear, possibly a cyst or not."]),
    ("[brackets] {braces} <angles> *stars* #hash @at", ["brackets braces angles stars hash at"]),
    ("What?! No!! Yes!!!", ["What? No! Yes!"]),
    ("end with comma,", ["end with colon:"]),
    # Contractions and clitics.
    ("It's the patient's scan; they're fine, can't say, won't.", ["It is the scan of the patient; they are fine."]),
    ("I cannot say; gonna need gimme lemme wanna see, d'ye know, 'tis more'n enough", ["I can not say"]),
    ("don't DON'T I'd you'll we've she's 'quoted'", ["do not I would you will we have she is quoted"]),
    # Abbreviations and multi-sentence texts for Punkt.
    ("Dr. Smith reviewed the CT, e.g. the liver. It was normal.", ["Dr. Smith saw the CT. The liver was normal."]),
    ("Findings: no mass, i.e. normal. Impression: negative vs. prior exam.", ["No mass. Negative compared with the prior exam."]),
    ("Approx. 5 mm nodule in segment No. 3. Mr. Brown was informed.", ["A 5 mm nodule in segment 3."]),
    ("The U.S. guidelines apply. Follow-up is advised.", ["US guidelines apply; follow up."]),
    ("J. R. R. Tolkien wrote it. The end.", ["Tolkien wrote it."]),
    ("Sentence one.Sentence two. sentence three.", ["Sentence one. Sentence two. Sentence three."]),
    ("(The liver is normal.) The spleen is normal.", ["The liver and spleen are normal."]),
    ('He said "stop." Then he left.', ['He said "stop". Then he left.']),
    ("Findings:\nLiver normal.\n\nImpression:\tnone.", ["Findings: liver normal. Impression: none."]),
    ("Lines\r\nwith\rcarriage returns.", ["Lines with carriage returns."]),
    # Sentence boundaries that Punkt and the Treebank rules disagree on, quotes around ends, lists.
    ('"Hello," she said. "Bye."', ["Hello, she said. Bye."]),
    ("1. Liver normal. 2. Spleen normal. 3. Kidneys normal.", ["Liver, spleen and kidneys normal."]),
    ("St. Mary's hospital, U.S.A., e.g., i.e., etc.", ["Saint Mary hospital in the USA etc."]),
    ("Done.\n", ["Done."]),
    ("end.' next.) last.]", ["end next last"]),
    ("Hmm... -- ok -- fine.", ["ok fine"]),
    ("Mr. and Mrs. Smith vs. Jones Inc. Ltd. Co. were there.", ["Smith versus Jones."]),
    ("A. B. Smith. C. D. Jones.", ["Smith and Jones."]),
    ("Note: see Fig. 3.A for details.", ["See figure 3A."]),
    ("Is it? Yes! No... Maybe.", ["Maybe."]),
    ("Value was 5. The next was 6.", ["Values 5 and 6."]),
    ("Size 2.5.Next line", ["Size 2.5. Next line"]),
    ("«Bonjour.» Il est parti.", ["Bonjour. Il est parti."]),
    ('"Quoted sentence." Another one.', ["Quoted sentence. Another one."]),
    ("Line one\n\nLine two.\n   \nLine three", ["Line one. Line two. Line three."]),
    ("Tabs\tand\u00a0nbsp\u2003em space\u3000ideographic", ["Tabs and nbsp em space ideographic"]),
    ("ÉNORME Foie. Àpres.", ["enorme foie apres"]),
    ("x-ray, CT-guided, T2-weighted, 5-mm, 3-4 cm, 2019-2020", ["xray CT guided T2 weighted 5 mm 3 to 4 cm"]),
    ("I.V. contrast was given. P.O. contrast too.", ["Intravenous and oral contrast."]),
    ("The lesion (arrow) measures 2 cm (previously 1.5 cm).", ["Lesion measures 2 cm, previously 1.5 cm."]),
    # Word boundaries where Python's two regex engines differ (combining marks, superscripts), odd clitics.
    ("cannot\u0301 can\u0301not gonna\u00b2 \u00b2cannot", ["can not"]),
    ("The '\u017f' and 'S and 'd and '\u212a", ["s and d"]),
    ("rock'n'roll o'clock y'all ma'am", ["rock and roll"]),
    # Box texts and closed-VQA style answers.
    ("<bx_start>[0.125, 0.3, 0.0, 0.5, 0.75, 1.0]<bx_end>", ["The liver is at <bx_start>[0.1, 0.3, 0.0, 0.5, 0.7, 1.0]<bx_end>."]),
    ("B. Sagittal", ["B. Sagittal"]),
    ("A. Axial B. Sagittal C. Coronal D. Oblique", ["C. Coronal"]),
    # Identical, case-only and single-word pairs.
    ("The liver is normal.", ["The liver is normal."]),
    ("THE LIVER IS NORMAL.", ["the liver is normal."]),
    ("a", ["a"]),
    ("I", ["i"]),
    # Several references (BLEU merges them; ROUGE and METEOR take the best).
    ("The liver is enlarged.", ["The liver is normal.", "Hepatomegaly is present.", "The liver is enlarged in size."]),
    ("No acute abnormality.", ["", "No acute abnormality is seen."]),
    ("Small cyst in the left kidney.", ["Left renal cyst.", "A small cyst is seen in the left kidney.", "Cyst."]),
]

ORGANS = [
    "liver", "spleen", "pancreas", "gallbladder", "left kidney", "right kidney", "urinary bladder", "aorta",
    "heart", "right lung", "left lung", "adrenal gland", "stomach", "colon", "prostate", "uterus", "thyroid",
    "brain", "vertebral body", "portal vein",
]
FINDINGS = [
    "is normal in size and attenuation",
    "appears enlarged",
    "shows a hypodense lesion",
    "contains multiple small cysts",
    "demonstrates heterogeneous enhancement",
    "is unremarkable",
    "shows diffuse fatty infiltration",
    "has a calcified nodule",
    "is mildly dilated",
    "reveals a well-defined mass",
    "shows no focal abnormality",
    "is atrophic",
]
SIZES = ["3.5cm", "1.2 cm", "12 mm", "0.8cm x 1.1cm", "2.0 x 3.1 x 4.5 cm", "5mm", "10%", "45 HU"]
EXTRAS = [
    "No free fluid is seen.",
    "No lymphadenopathy.",
    "The remaining organs are unremarkable.",
    "Compared with the prior study of 2021-03-04, there is no change.",
    "Findings are consistent with a benign process.",
    "Clinical correlation is recommended.",
    "There is mild atherosclerotic calcification.",
    "Degenerative changes of the lumbar spine.",
]
SYNONYMS = {
    "enlarged": "expanded", "lesion": "wound", "mass": "lump", "small": "little", "normal": "regular",
    "shows": "displays", "demonstrates": "shows", "seen": "observed", "mild": "gentle", "multiple": "many",
    "no": "none", "change": "alteration", "benign": "harmless", "recommended": "advised", "process": "procedure",
    "cysts": "vesicles", "dilated": "distended", "reveals": "uncovers", "large": "big", "size": "sizing",
}
INFLECT = {
    "lesion": "lesions", "cysts": "cyst", "enlarged": "enlarging", "shows": "showed", "is": "was", "contains": "containing",
    "appears": "appeared", "demonstrates": "demonstrating", "calcified": "calcifying", "dilated": "dilating",
    "reveals": "revealed", "changes": "change", "organs": "organ", "nodule": "nodules", "infiltration": "infiltrating",
}


def sentence(rng):
    organ = rng.choice(ORGANS)
    finding = rng.choice(FINDINGS)
    text = f"The {organ} {finding}"
    if rng.random() < 0.5:
        text += f" measuring {rng.choice(SIZES)}"
    return text + "."


def report(rng):
    parts = [sentence(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.6:
        parts.append(rng.choice(EXTRAS))
    return " ".join(parts)


def perturb(rng, text):
    words = text.split(" ")
    out = []
    for w in words:
        core = w.rstrip(".,")
        tail = w[len(core):]
        r = rng.random()
        if core.lower() in SYNONYMS and r < 0.35:
            core = SYNONYMS[core.lower()]
        elif core.lower() in INFLECT and r < 0.6:
            core = INFLECT[core.lower()]
        elif r < 0.08:
            continue  # dropped word
        elif r < 0.12:
            out.append(core)  # repeated word
        elif r < 0.15:
            core = core.upper()
        out.append(core + tail)
    text = " ".join(out)
    r = rng.random()
    if r < 0.15:
        sents = [s.strip() for s in text.split(". ") if s.strip()]
        rng.shuffle(sents)
        text = ". ".join(sents)
    elif r < 0.25:
        text = text.replace(".", "")
    elif r < 0.32:
        text = text.replace(". ", ".\n")
    elif r < 0.37:
        text = "  " + text.lower() + "  "
    return text


def main():
    rng = random.Random(20240612)
    pairs = list(EDGE_CASES)
    for _ in range(170):
        ref = report(rng)
        kind = rng.random()
        if kind < 0.07:
            pred = report(rng)  # unrelated report
        elif kind < 0.1:
            pred = ref
        else:
            pred = perturb(rng, ref)
        refs = [ref]
        if rng.random() < 0.08:
            refs.append(perturb(rng, ref))
        pairs.append((pred, refs))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for i, (pred, refs) in enumerate(pairs):
            f.write(json.dumps({"id": i, "prediction": pred, "references": refs}, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    main()
