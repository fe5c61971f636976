#!/usr/bin/env python3
"""Import circles in the library: the modules of crates/detoxfuse/src (top level, and one level
down inside each directory module) as a graph of `crate::x` / `super::x` uses, and its
strongly connected components with more than one module. Prints them, exits 1 if any.
Test modules (after `#[cfg(test)]`) do not count."""
import pathlib, re, sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "crates/detoxfuse/src"

def modules():
    """name -> source text, for `x` (x.rs or x/mod.rs) and `x::y` (x/y.rs)."""
    out = {}
    for p in SRC.rglob("*.rs"):
        rel = p.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts in (["lib"], ["main"], []):
            continue
        text = p.read_text()
        text = text.split("#[cfg(test)]")[0]
        text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
        out["::".join(parts[:2])] = out.get("::".join(parts[:2]), "") + text
    return out

def edges(mods):
    g = {m: set() for m in mods}
    for m, text in mods.items():
        parent = m.split("::")[0]
        for path in re.findall(r"\bcrate::([a-z_]+(?:::[a-z_]+)?)", text):
            a = path.split("::")
            for cand in ("::".join(a[:2]), a[0]):
                if cand in mods and cand != m and not m.startswith(cand + "::") and not cand.startswith(m + "::"):
                    g[m].add(cand)
                    break
        if "::" in m:
            for y in re.findall(r"\bsuper::([a-z_]+)", text):
                cand = f"{parent}::{y}"
                if cand in mods and cand != m:
                    g[m].add(cand)
    return g

def sccs(g):
    index, low, stack, on, out, i = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            c = []
            while True:
                w = stack.pop(); on.discard(w); c.append(w)
                if w == v: break
            out.append(c)
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]

mods = modules()
circles = sccs(edges(mods))
print(f"{len(mods)} modules, {len(circles)} import circles")
for c in circles:
    print("  circle:", " <-> ".join(sorted(c)))
sys.exit(1 if circles else 0)
