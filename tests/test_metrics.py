import torch

from vlp.metrics import retrieval_recall, topk_accuracy


def _loop_recall(scores, text_to_image, k):
    n_img, n_txt = scores.shape
    t2i = sum(int(text_to_image[t]) in scores[:, t].argsort(descending=True)[:k].tolist()
              for t in range(n_txt)) / n_txt
    i2t = 0
    for i in range(n_img):
        top = scores[i].argsort(descending=True)[:k].tolist()
        i2t += any(int(text_to_image[t]) == i for t in top)
    return t2i, i2t / n_img


def test_recall_matches_loop_reference_with_multiple_captions():
    torch.manual_seed(0)
    n_img = 12
    text_to_image = torch.tensor([i // 2 for i in range(2 * n_img)])  # two captions each
    scores = torch.randn(n_img, 2 * n_img)
    got = retrieval_recall(scores, text_to_image)
    for k in (1, 5, 10):
        t2i, i2t = _loop_recall(scores, text_to_image, k)
        assert abs(got[f"t2i_r{k}"] - t2i) < 1e-6
        assert abs(got[f"i2t_r{k}"] - i2t) < 1e-6


def test_perfect_scores_give_full_recall():
    scores = torch.eye(5)
    got = retrieval_recall(scores, torch.arange(5))
    assert all(v == 1.0 for v in got.values())


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])  # hit at 1, hit at 2, miss
    acc = topk_accuracy(logits, labels, ks=(1, 2))
    assert abs(acc["top1"] - 1 / 3) < 1e-6
    assert abs(acc["top2"] - 2 / 3) < 1e-6
