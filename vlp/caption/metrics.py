"""Caption metrics: the COCO caption evaluation (pycocoevalcap) against all references.

BLEU-1..4, ROUGE-L and CIDEr-D are pycocoevalcap's pure-Python scorers; METEOR 1.5 and
the Stanford PTB tokenizer that the COCO protocol runs first are Java programs shipped in
the same package. Without a `java` on PATH, captions are tokenized by `simple_tokenize`
(below) and METEOR is left out; the result says which tokenizer was used, because scores
from the two can differ slightly.

Scores are pycocoevalcap's own scale: 0..1 for BLEU, METEOR and ROUGE-L; CIDEr-D is
unbounded (papers print it x100: BLIP's "CIDEr 133" is 1.33 here). CIDEr-D's document
frequencies come from the references being scored, so it is only comparable between
runs on the same reference set.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# What the COCO evaluation drops after PTB tokenization (pycocoevalcap's PUNCTUATIONS).
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                   ":", "-", "--", "...", ";"}
TOKENIZERS = ("auto", "ptb", "simple")

# PTB splits English clitics off the word before them ("don't" -> "do n't", "cat's" ->
# "cat 's"), writing a curly apostrophe there as a straight one.
_CLITIC = re.compile(r"(?<=\w)(n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m))\b")
# A number with separators ("5:30", "1,000"), a word (letters/digits; inner hyphens, dots
# and apostrophes kept, as PTB keeps "t-shirt", "3.5", "o'clock", "d’ivoire"), a clitic, or
# any single other character.
_TOKEN = re.compile(r"\d+(?:[:,]\d+)+|\w+(?:[-.'\u2019]\w+)*|n't|'\w+|\S")
# PTB writes brackets as -LRB- etc.; lower-cased, they no longer match the punctuation list,
# so the COCO evaluation keeps them as words. They are kept here too, to agree.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """The fallback for the PTB tokenizer: lower-case, split words from punctuation and
    clitics, brackets as PTB names them, then drop the punctuation tokens the COCO
    evaluation drops (and double quotes, which PTB turns into `` and ''). It agrees with
    PTB on plain captions; it differs on rarer cases (currency, abbreviations such as
    "u.s.", PTB's other normalizations)."""
    text = _CLITIC.sub(lambda m: " " + m[1].replace("\u2019", "'"), text.lower().replace("\n", " "))
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Stanford PTB tokenization (pycocoevalcap's jar, lower-cased, one line per text),
    then the COCO punctuation removal."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    # The package writes its input file into site-packages; a temp dir works read-only too.
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(t.replace("\n", " ") for t in texts))
        out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", str(source)],
                             capture_output=True, check=True).stdout.decode()
    lines = out.split("\n")[:len(texts)]
    lines += [""] * (len(texts) - len(lines))  # blank trailing inputs print nothing
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in lines]


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]],
                    tokenizer: str = "auto", meteor: bool = True) -> dict:
    """{"n", "tokenizer": "ptb"|"simple", "bleu1".."bleu4", "rougeL", "cider", "meteor"}
    for one predicted caption per id against all its references. METEOR is there only
    with Java (and `meteor`). `tokenizer`: "auto" (PTB when Java is found), "ptb", "simple"."""
    return score_runs({"run": predictions}, references, tokenizer, meteor)["run"]


def score_runs(runs: dict[str, dict[str, str]], references: dict[str, list[str]],
               tokenizer: str = "auto", meteor: bool = True) -> dict[str, dict]:
    """`caption_metrics` for several sets of predictions of the same ids (greedy, beam, ...):
    one tokenizer call and one METEOR process for all of them (each Java start costs
    seconds; METEOR's loads a 60 MB paraphrase table)."""
    ids = _check(runs, references, tokenizer)
    use_ptb = tokenizer == "ptb" or (tokenizer == "auto" and java_available())
    texts = [r for i in ids for r in references[i]] + [run[i] for run in runs.values() for i in ids]
    tokens = iter(ptb_tokenize(texts) if use_ptb else [simple_tokenize(t) for t in texts])
    gts = {i: [next(tokens) for _ in references[i]] for i in ids}
    results = {name: {i: [next(tokens)] for i in ids} for name in runs}
    scores = {name: {"n": len(ids), "tokenizer": "ptb" if use_ptb else "simple", **_scores(gts, res)}
              for name, res in results.items()}
    if meteor and use_ptb:
        for name, value in _meteor(gts, results).items():
            scores[name]["meteor"] = value
    return scores


def _check(runs: dict[str, dict], references: dict, tokenizer: str) -> list[str]:
    """The ids every run covers, after checking the arguments."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "ptb" and not java_available():
        raise ValueError("the PTB tokenizer needs a Java runtime (`java` on PATH); "
                         "install one (Debian: default-jre-headless) or use tokenizer='simple'")
    if not runs or not next(iter(runs.values())):
        raise ValueError("no captions to score")
    ids = sorted(next(iter(runs.values())))
    for name, predictions in runs.items():
        if sorted(predictions) != ids:
            raise ValueError(f"caption run {name!r} covers other ids than the first run")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} captions have no reference, e.g. id {missing[0]!r}")
    return ids


def _scores(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}
    out["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


def _meteor(gts: dict, runs: dict[str, dict]) -> dict[str, float]:
    """METEOR 1.5 of each run through one jar process (about 2 GB of Java heap for the
    paraphrase table); a failure is logged and the metric left out rather than losing the
    other scores."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
        try:
            return {name: float(scorer.compute_score(gts, res)[0]) for name, res in runs.items()}
        finally:
            del scorer  # its __del__ stops the Java process
    except (OSError, ValueError) as err:
        log.warning("METEOR failed (%s); reporting the other metrics without it", err)
        return {}
