"""Size and shape of the code, against the project's aims for it (the last lines it prints).

For sft.py, reward.py, ppo.py, chat.py, each module of common (common.py or common/*.py) and README.md: lines, code
lines (not blank, not a comment, not a docstring; a bare string statement such as a flag's docstring counts as one),
functions (methods and nested ones included) and the longest function. For the stage scripts also `main`'s length
and its McCabe cyclomatic complexity, the number of `Args` flags and the length in words of their docstrings.

The complexity is the `mccabe` package's (flake8's C901), recomputed here from `ast` alone: each if/elif, for/while
and try counts 1, each except handler 1 more, each function defined inside another 1 (its own branches count towards
the outer one); `else`, `finally`, `with`, `match` and boolean operators count nothing. Functions inside a
module-level if/for/try belong to that block's graph, as in mccabe. `--mccabe FILE` prints what
`python -m mccabe --min 1 FILE` prints, to compare.

    python bench/size.py
    python bench/size.py --mccabe ppo.py
"""

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["sft.py", "reward.py", "ppo.py", "chat.py"]
BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def added_complexity(body: list, cls: str = "") -> int:
    """What a block of statements adds to the complexity of the mccabe graph it belongs to."""
    n = 0
    for s in body:
        if isinstance(s, FUNCTIONS):  # a closure: one more path around it
            n += 1 + added_complexity(s.body, cls)
        elif isinstance(s, ast.ClassDef):
            n += added_complexity(s.body, cls + s.name + ".")
        elif isinstance(s, BRANCHES):
            handlers = getattr(s, "handlers", [])
            n += 1 + len(handlers) + added_complexity(s.body, cls) + added_complexity(s.orelse, cls)
            n += sum(added_complexity(h.body, cls) for h in handlers)
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            n += added_complexity(s.body, cls)
    return n


def mccabe(body: list, cls: str = "", graphs: dict | None = None) -> dict:
    """{key: (name as mccabe prints it, complexity)} of the graphs mccabe makes of a module, in its order."""
    graphs = {} if graphs is None else graphs
    for s in body:
        if isinstance(s, FUNCTIONS):
            graphs[cls + s.name] = (f"{s.lineno}:{s.col_offset}: {cls + s.name!r}", 1 + added_complexity(s.body, cls))
        elif isinstance(s, ast.ClassDef):
            mccabe(s.body, cls + s.name + ".", graphs)
        elif isinstance(s, BRANCHES):
            kind = {ast.If: "If", ast.Try: "TryExcept"}.get(type(s), "Loop")
            graphs[f"{cls}{kind} {s.lineno}"] = (f"{kind} {s.lineno}", 1 + added_complexity([s], cls))
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            mccabe(s.body, cls, graphs)
    return graphs


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested ones included."""
    for node in ast.iter_child_nodes(tree):
        named = isinstance(node, (ast.ClassDef, *FUNCTIONS))
        if isinstance(node, FUNCTIONS):
            yield prefix + node.name, node
        yield from functions(node, prefix + node.name + "." if named else prefix)


def code_lines(text: str, tree: ast.AST) -> int:
    docstrings = {i for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str) for i in range(node.lineno, node.end_lineno + 1)}
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = {i for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type not in skip
             for i in range(tok.start[0], tok.end[0] + 1)}
    return len(lines - docstrings)


def flags(tree: ast.AST) -> list[tuple[str, int]]:
    """(name, words in its docstring) of each field of `class Args`."""
    args = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"), None)
    body = args.body if args else []
    return [(a.target.id, len(d.value.value.split()) if isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant)
             else 0) for a, d in zip(body, body[1:] + [None]) if isinstance(a, ast.AnnAssign)]


def measure(path: Path) -> dict:
    text = path.read_text()
    row = {"file": str(path.relative_to(ROOT)), "lines": len(text.splitlines()), "kb": len(text.encode()) / 1024}
    if path.suffix != ".py":
        return row
    tree = ast.parse(text)
    funcs = [(name, f.end_lineno - f.lineno + 1) for name, f in functions(tree)]
    row.update(code=code_lines(text, tree), funcs=len(funcs), longest=max(funcs, key=lambda f: f[1], default=None))
    main = next((f for f in tree.body if isinstance(f, FUNCTIONS) and f.name == "main"), None)
    if path.name in STAGES and main:
        row.update(main=main.end_lineno - main.lineno + 1, mccabe=mccabe(tree.body)["main"][1], flags=flags(tree))
    return row


def table(rows: list[list], header: list[str]):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main():
    if sys.argv[1:2] == ["--mccabe"]:
        for name, complexity in mccabe(ast.parse(Path(sys.argv[2]).read_text()).body).values():
            print(name, complexity)
        return
    common = [ROOT / "common.py"] if (ROOT / "common.py").exists() else \
        sorted((ROOT / "common").glob("*.py"), key=lambda p: (p.name != "__init__.py", p.name))
    rows = {r["file"]: r for r in map(measure, [ROOT / s for s in STAGES] + common + [ROOT / "README.md"])}
    table([[r["file"], r["lines"], r.get("code", "-"), r.get("funcs", "-"),
            f"{r['longest'][0]} ({r['longest'][1]})" if r.get("longest") else "-", r.get("main", "-"),
            r.get("mccabe", "-")] for r in rows.values()],
          ["file", "lines", "code", "functions", "longest function (lines)", "main", "main mccabe"])
    print()
    stage_flags = [(s, rows[s]["flags"]) for s in STAGES if rows[s].get("flags")]
    table([[s, len(f), f"{sum(w for _, w in f) / len(f):.1f}", "{} ({})".format(*max(f, key=lambda x: x[1]))]
           for s, f in stage_flags], ["stage", "flags", "mean docstring words", "longest docstring (words)"])
    print()
    thin, others = rows[str(common[0].relative_to(ROOT))], [rows[str(p.relative_to(ROOT))] for p in common[1:]]
    biggest = max(others, key=lambda r: r["lines"], default=None)
    ppo, readme = rows["ppo.py"], rows["README.md"]
    aims = [("ppo.py <= 800 lines", f"{ppo['lines']}", ppo["lines"] <= 800),
            ("ppo.py main <= 200 lines", f"{ppo.get('main')}", ppo.get("main", 0) <= 200),
            ("ppo.py main mccabe <= 25", f"{ppo.get('mccabe')}", ppo.get("mccabe", 0) <= 25),
            (f"thin common ({thin['file']}) <= 700 lines", f"{thin['lines']}", thin["lines"] <= 700),
            ("every other common module <= 450 lines",
             f"{biggest['file']} {biggest['lines']}" if biggest else "(none)", all(r["lines"] <= 450 for r in others)),
            ("README.md <= 300 lines and <= 30 KB", f"{readme['lines']} lines, {readme['kb']:.1f} KB",
             readme["lines"] <= 300 and readme["kb"] <= 30),
            ("sft.py, reward.py, chat.py <= 400 lines each", ", ".join(str(rows[s]["lines"]) for s in STAGES if s !=
                                                                        "ppo.py"),
             all(rows[s]["lines"] <= 400 for s in STAGES if s != "ppo.py"))]
    table([[aim, value, "ok" if ok else "over"] for aim, value, ok in aims], ["aim", "now", ""])


if __name__ == "__main__":
    main()
