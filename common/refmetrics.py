"""Reference metrics: generated answers against reference answers, BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score,
Porter stemming). Both packages are optional (requirements-metrics.txt) and imported only when a score is asked for;
docs/stages.md, "Reference metrics", says when these numbers mean something."""

import importlib

from common import UserError

NAMES = ("bleu", "rouge1", "rouge2", "rougeL")
INSTALL = "pip install -r requirements-metrics.txt"
PACKAGES = {"sacrebleu": "sacrebleu", "rouge_score.rouge_scorer": "rouge-score"}  # module -> package to install


def missing() -> str | None:
    """Why the metrics cannot be computed (the packages not installed, and the command that installs them), or None."""
    absent = []
    for module, package in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(package)
    if absent:
        return f"BLEU and ROUGE need the optional package(s) {', '.join(absent)}, not installed: {INSTALL}"
    return None


def _modules():
    if why := missing():
        raise UserError(why)
    return importlib.import_module("sacrebleu"), importlib.import_module("rouge_score.rouge_scorer")


def _rouge(rouge_scorer, hypotheses: list[str], references: list[str]) -> list[dict]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} answers for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return [{k: s.fmeasure for k, s in scorer.score(ref, hyp).items()} for hyp, ref in zip(hypotheses, references)]


def answer_scores(hypotheses: list[str], references: list[str]) -> list[dict]:
    """Per answer: sentence BLEU (sacrebleu's sentence_bleu, 0-100, its default exponential smoothing) and ROUGE-1/2/L
    F1 (0-1), each answer against its one reference."""
    sacrebleu, rouge_scorer = _modules()
    rouge = _rouge(rouge_scorer, hypotheses, references)
    return [{"bleu": sacrebleu.sentence_bleu(hyp, [ref]).score, **r}
            for hyp, ref, r in zip(hypotheses, references, rouge)]


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Over all answers: corpus BLEU (sacrebleu's corpus_bleu, 0-100: n-gram counts summed over the corpus, not a mean
    of sentence scores) and the mean ROUGE-1/2/L F1 of the answers (0-1; rouge-score scores single pairs)."""
    if not hypotheses:
        raise ValueError("no answers to score")
    sacrebleu, rouge_scorer = _modules()
    rouge = _rouge(rouge_scorer, hypotheses, references)
    means = {k: sum(r[k] for r in rouge) / len(rouge) for k in NAMES[1:]}
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score, **means}
