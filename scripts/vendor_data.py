#!/usr/bin/env python3
"""Builds the project's vendored run-time data (`data/`) from the development data set
(`../shared/data`), byte for byte where it copies and losslessly where it compacts.

ToxiGen's few-shot files (`{hate,neutral}_<group>_1k.txt`, 16 MB) are 1,000 lines per group,
each a list of a few statements out of a small pool, joined by a literal backslash-n. The pool
is 754 distinct segments in all: `data/toxigen/<kind>_<group>.segments.txt` holds a group's
segments (one per line, as they appear between the separators, spaces kept) and
`<kind>_<group>.lists.txt` the segment numbers of each of the 1,000 lines. `detoxfuse`
rebuilds the original files from them on first use and checks their sha256
(`data/manifest.json`), so every recipe reads exactly what it read from `../shared/data`.

Run from the project root: python3 scripts/vendor_data.py [SHARED_DATA_DIR]
"""
import hashlib
import json
import os
import shutil
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else os.path.join("..", "shared", "data")
OUT = "data"
SEP = "\\n"  # the two characters backslash and n


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def main():
    manifest = {"source": "../shared/data (see data/README.md)", "files": {}}
    for sub, name in [
        ("rtp", "challenging-toxic-1196.jsonl"),
        ("rtp", "nontoxic-1200.jsonl"),
        ("hh-rlhf", "harmless-base-test.jsonl.gz"),
    ]:
        os.makedirs(os.path.join(OUT, sub), exist_ok=True)
        src = os.path.join(SRC, sub, name)
        dst = os.path.join(OUT, sub, name)
        shutil.copyfile(src, dst)
        manifest["files"][f"{sub}/{name}"] = {"sha256": sha256(open(src, "rb").read())}
    os.makedirs(os.path.join(OUT, "toxigen"), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(SRC, "toxigen"))):
        if not name.endswith("_1k.txt"):
            continue
        raw = open(os.path.join(SRC, "toxigen", name), "rb").read()
        text = raw.decode("utf-8")
        assert text.endswith("\n") and "\r" not in text, name
        lines = text[:-1].split("\n")
        pool, rows = {}, []
        for line in lines:
            rows.append([pool.setdefault(seg, len(pool)) for seg in line.split(SEP)])
        segs = sorted(pool, key=pool.get)
        assert all("\n" not in s for s in segs)
        stem = name[: -len("_1k.txt")]
        seg_text = "".join(s + "\n" for s in segs)
        list_text = "".join(" ".join(map(str, r)) + "\n" for r in rows)
        # The rebuild the Rust side does, checked here.
        rebuilt = "".join(SEP.join(segs[i] for i in r) + "\n" for r in rows)
        assert rebuilt.encode("utf-8") == raw, name
        open(os.path.join(OUT, "toxigen", stem + ".segments.txt"), "w", encoding="utf-8").write(seg_text)
        open(os.path.join(OUT, "toxigen", stem + ".lists.txt"), "w", encoding="utf-8").write(list_text)
        manifest["files"][f"toxigen/{name}"] = {
            "sha256": sha256(raw),
            "segments": f"toxigen/{stem}.segments.txt",
            "lists": f"toxigen/{stem}.lists.txt",
        }
    open(os.path.join(OUT, "manifest.json"), "w").write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(manifest['files'])} files -> {OUT}/")


if __name__ == "__main__":
    main()
