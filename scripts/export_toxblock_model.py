#!/usr/bin/env python3
"""Export PyPI tox-block==0.1.2's trained model for the Rust second judge (`score::ToxBlock`),
and write a test fixture of the package's own predictions.

tox-block (MIT, Jan Zuber 2020) is a bidirectional LSTM trained on the Jigsaw Toxic Comment
Classification data: Keras word tokenizer (20,000 words) -> Embedding(20000, 50) ->
Bidirectional(LSTM(50, return_sequences, hard_sigmoid gates)) -> GlobalMaxPooling1D ->
Dense(50, relu) -> Dense(6, sigmoid) over toxic, severe_toxic, obscene, threat, insult,
identity_hate. It is a neural, word-order-aware judge, unlike the lexical TF-IDF + SVM scorer
the project uses by default, hence the second opinion.

Set up the environment with scripts/setup_judge_env.sh (.venv-judge: tensorflow-cpu 2.15.1,
keras-preprocessing 1.1.2, tox-block 0.1.2, h5py), then:
  .venv-judge/bin/python scripts/export_toxblock_model.py
Writes assets/tox_block_0.1.2.safetensors (f32 weights), assets/tox_block_0.1.2.vocab.json
(the tokenizer's settings and its 19,999 words in index order) and tests/fixtures/tox_block.json.
"""
import hashlib
import json
import os
import pickle
import struct
import sys

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


class _State:
    """Stands in for the pickled TokenSequencer and Keras Tokenizer: keeps their state only."""

    def __setstate__(self, state):
        self.__dict__.update(state)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in ("TokenSequencer", "Tokenizer"):
            return _State
        return super().find_class(module, name)


def package_dir():
    import tox_block

    return os.path.dirname(tox_block.__file__)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def export():
    models = os.path.join(package_dir(), "trained_models")
    enc_path = os.path.join(models, "encoder_0.1.2.pkl")
    h5_path = os.path.join(models, "lstm_model_0.1.2.h5")
    with open(enc_path, "rb") as f:
        enc = _Unpickler(f).load()
    tok = enc.tokenizer.__dict__
    assert tok["oov_token"] is None and not tok["char_level"] and tok["lower"]
    num_words = tok["num_words"]
    by_index = {i: w for w, i in tok["word_index"].items() if i < num_words}
    words = [by_index[i] for i in range(1, num_words)]
    vocab = {
        "filters": tok["filters"],
        "split": tok["split"],
        "lower": tok["lower"],
        "num_words": num_words,
        "max_sequence_length": enc.max_sequence_length,
        "classes": CLASSES,
        "words": words,
        "source": {
            "package": "tox-block==0.1.2 (PyPI, MIT)",
            "encoder_sha256": sha256(enc_path),
            "model_sha256": sha256(h5_path),
        },
    }
    with open(os.path.join(ROOT, "assets", "tox_block_0.1.2.vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    w = h5py.File(h5_path, "r")["model_weights"]
    get = lambda p: np.array(w[p])
    tensors = {"embedding": get("embedding/embedding/embeddings:0")}
    for d in ("forward", "backward"):
        for part in ("kernel", "recurrent_kernel", "bias"):
            tensors[f"{d}.{part}"] = get(f"bidirectional/bidirectional/{d}_lstm/{part}:0")
    tensors["dense.kernel"] = get("dense/dense/kernel:0")
    tensors["dense.bias"] = get("dense/dense/bias:0")
    tensors["out.kernel"] = get("dense_1/dense_1/kernel:0")
    tensors["out.bias"] = get("dense_1/dense_1/bias:0")
    write_safetensors(os.path.join(ROOT, "assets", "tox_block_0.1.2.safetensors"), tensors)


def fixture():
    """The package's own predictions (Keras on TensorFlow, rescale off) on hand-written texts
    and on generated continuations."""
    from tox_block.prediction import make_predictions

    texts = [
        "You are a stupid idiot and I hate you",
        "Thank you, have a lovely day.",
        "!!!",
        " and have zero competence. Except for a few stupid mortals who",
        "I’m going to kill you, you worthless piece of shit",
        "The weather in Paris is mild in spring.",
        "WHAT THE HELL are you doing??? Get out of my house!",
        "shit " * 150,
        "Ünïcödé wörds — ΣΟΦΙΑΣ and İstanbul",
        "she's a b*tch and a wh0re",
        "fuck\tthis\nshit",
        "go back to where you came from, nobody wants your kind here",
        "He said: \"don't\" (twice) [sic]; ok?",
    ]
    # and the continuations the evaluation scores: the first two samples of every tenth prompt
    # of the standard run's base row (the package refuses empty texts)
    gens = os.path.join(ROOT, "results", "standard-smollm2-challenging", "generations", "base.jsonl")
    with open(gens) as f:
        for i, line in enumerate(f):
            if i % 10 == 0:
                texts += [s["text"] for s in json.loads(line)["samples"][:2] if s["text"].strip()]
    p = make_predictions(texts, rescale=False)
    rows = [{"text": t, "probabilities": [float(p[i][c]) for c in CLASSES]}
            for i, t in enumerate(texts)]
    with open(os.path.join(ROOT, "tests", "fixtures", "tox_block.json"), "w") as f:
        json.dump({"classes": CLASSES, "rows": rows}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    export()
    if "--no-fixture" not in sys.argv:
        fixture()
