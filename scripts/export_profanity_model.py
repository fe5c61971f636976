#!/usr/bin/env python3
"""Export PyPI alt-profanity-check==1.9.1's trained model to plain JSON for the Rust scorer,
and write a test fixture of its predict_prob on generated sentences.

Needs scikit-learn==1.9.1 (to unpickle the model) and alt-profanity-check==1.9.1:
  .venv-ref/bin/pip install scikit-learn==1.9.1 alt-profanity-check==1.9.1
Usage: scripts/export_profanity_model.py
Writes assets/profanity_check_1.9.1.json and tests/fixtures/profanity_check.json.

The model (package licence: MIT): TfidfVectorizer(lowercase, token_pattern (?u)\\b\\w\\w+\\b,
english stop words, l2 norm, smooth idf) -> CalibratedClassifierCV(LinearSVC, sigmoid, 5
folds); probability = mean over folds of 1 / (1 + exp(a * (w.x + b0) + b)).
"""
import json
import os
import random

import numpy as np
import profanity_check
from profanity_check import profanity_check as pc
import sklearn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def export():
    v, m = pc.vectorizer, pc.model
    vocab = sorted(v.vocabulary_.items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    folds = []
    for c in m.calibrated_classifiers_:
        est = c.estimator
        cal = c.calibrators[0]
        folds.append({
            "coef": [float(x) for x in np.asarray(est.coef_).ravel()],
            "intercept": float(np.asarray(est.intercept_).ravel()[0]),
            "a": float(cal.a_),
            "b": float(cal.b_),
        })
    out = {
        "source": "PyPI alt-profanity-check==1.9.1 (MIT), exported by scripts/export_profanity_model.py",
        "sklearn_version": sklearn.__version__,
        "lowercase": v.lowercase,
        "token_pattern": v.token_pattern,
        "norm": v.norm,
        "sublinear_tf": v.sublinear_tf,
        "vocabulary": [w for w, _ in vocab],
        "idf": [float(x) for x in v.idf_],
        "folds": folds,
    }
    with open(os.path.join(ROOT, "assets", "profanity_check_1.9.1.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    return [w for w, _ in vocab]


def sentences(vocab):
    rng = random.Random(20261128)
    # a third of the words come from the terms the model weighs most towards "offensive",
    # so that the fixture covers high probabilities too
    weight = np.mean([np.asarray(c.estimator.coef_).ravel() for c in pc.model.calibrated_classifiers_], 0)
    strong = [vocab[i] for i in np.argsort(-weight)[:300]]
    extra = ["café", "naïve", "Straße", "ÉCOLE", "Ελληνικά", "ΣΟΦΟΣ", "москва", "日本語", "中文字",
             "한국어", "😀", "🔥🔥", "e\u0301te\u0301", "x²", "½", "١٢٣", "İstanbul", "ǅemal", "_",
             "a_b", "foo-bar", "it's", "don't", "U.S.A.", "3.14", "2024", "‿join", "ⅻ", "ﬁne"]
    fixed = ["", "   ", "a", "I", "You are an idiot", "what the fuck", "Have a nice day!",
             "SHUT UP you stupid moron", "f*** this", "hello world", "damn it", "The weather is lovely."]
    out = list(fixed)
    while len(out) < 240:
        n = rng.randint(1, 14)
        pools = [vocab] * 5 + [strong] * 3 + [extra] * 2
        words = [rng.choice(rng.choice(pools)) for _ in range(n)]
        s = " ".join(words)
        if rng.random() < 0.3:
            s = s.upper()
        if rng.random() < 0.3:
            s = s.replace(" ", rng.choice([", ", "\n", "  ", "\t", "...", "!"]))
        out.append(s)
    return out


def main():
    vocab = export()
    sents = sentences(vocab)
    probs = profanity_check.predict_prob(sents)
    with open(os.path.join(ROOT, "tests", "fixtures", "profanity_check.json"), "w") as f:
        json.dump({"reference": "alt-profanity-check 1.9.1 predict_prob", "cases": [
            {"text": s, "prob": float(p)} for s, p in zip(sents, probs)]}, f, ensure_ascii=False, indent=0)
    print(f"{len(vocab)} terms, {len(sents)} fixture sentences, {sum(p >= 0.5 for p in probs)} with p >= 0.5")


if __name__ == "__main__":
    main()
