"""Summarise a mutmut run (mutants/**/*.meta) per source folder into results/mutation/mutation.json.

Run from the repository root after ``mutmut run`` (``make mutation`` does both). A mutant counts as killed when a
test failed (or timed out: the mutation made the code loop); "survived" and "no tests" are the mutants no fast test
caught; "not checked" are the ones the run did not reach (interrupted, or a subset was asked for).
"""

from __future__ import annotations

import ast
import difflib
import io
import json
import math
import re
import sys
import tokenize
from collections import Counter, defaultdict
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", -11: "segfault",
          -9: "segfault", None: "not checked"}  # fmt: skip
# the groups the report counts: the recycling code (shared, and in each method's home), the D2DMoE code (its home),
# export, train and eval
GROUPS = {"upcycle/methods/d2dmoe/": "d2dmoe code", "upcycle/methods/": "recycling", "upcycle/recycling/": "recycling",
          "upcycle/export/": "export", "upcycle/train/": "train", "upcycle/eval/": "eval"}  # fmt: skip


def function_sources(mutated: Path) -> dict[str, str]:
    """Every function of a mutmut-rewritten file (originals ``*__mutmut_orig`` and mutants ``*__mutmut_N``)."""
    text = mutated.read_text()
    lines = text.splitlines()
    return {node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno]) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name}  # fmt: skip


def without_text(line: str) -> str:
    """``line`` with the contents of its string literals blanked (f-strings included) and stacklevel dropped."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip()).readline))
        skip = (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        kept = " ".join("S" if t.type == tokenize.STRING or "FSTRING" in tokenize.tok_name[t.type] else t.string
                        for t in tokens if t.type not in skip)  # fmt: skip
    except (tokenize.TokenError, IndentationError, SyntaxError):  # a line of a multi-line string or call
        kept = re.sub(r"([\"']).*?(\1|$)", "S", line)
    text = re.sub(r"\s+", "", kept).replace("None", "S")
    return re.sub(r"stacklevel=\d+,?", "", re.sub(r"S+", "S", text))


def literals(line: str) -> list[str]:
    """The string literals of one line of code, in order (an f-string as one literal)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip()).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):  # a line of a multi-line string or call
        return [m.group(2) for m in re.finditer(r"([\"'])(.*?)(\1|$)", line)]
    found, fstring = [], None
    for token in tokens:
        name = tokenize.tok_name[token.type]
        if name == "FSTRING_START":
            fstring = ""
        elif name == "FSTRING_END":
            found.append(fstring or "")
            fstring = None
        elif fstring is not None:
            fstring += token.string if name == "FSTRING_MIDDLE" else "{}"
        elif token.type == tokenize.STRING:
            found.append(token.string)
    return found


def changed_literals(minus: list[str], plus: list[str]) -> list[str]:
    """The original literals a mutant changed (all of the removed lines' literals where they cannot be paired)."""
    before = [text for line in minus for text in literals(line)]
    after = [text for line in plus for text in literals(line)]
    if len(before) != len(after):
        return before
    return [old for old, new in zip(before, after, strict=True) if old != new]


# how output looks, not what it is: plot styling (in plotting calls) and progress-bar display (in any call)
PLOT_CALLS = {"Figure", "subplots", "add_subplot", "imshow", "colorbar", "savefig", "plot", "legend", "grid",
              "set_xlabel", "set_ylabel", "set_title", "set_xticks", "set_yticks", "tight_layout"}  # fmt: skip
PLOT_STYLE = {"figsize", "fontsize", "dpi", "cmap", "aspect", "interpolation", "layout", "linewidth", "alpha",
              "color", "markersize", "label"}  # fmt: skip
PROGRESS_STYLE = {"desc", "unit", "leave", "dynamic_ncols"}


def without_style(lines: list[str]) -> str | None:
    """The statements with every styling keyword argument removed (see above), or None when they do not parse on
    their own."""
    text = "\n".join(line.strip() for line in lines)
    try:
        tree = ast.parse(text + (" pass" if text.endswith(":") else ""))  # a compound statement's header alone
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            style = PROGRESS_STYLE | (PLOT_STYLE if func in PLOT_CALLS else set())
            node.keywords = [k for k in node.keywords if k.arg not in style]
    return ast.dump(tree)


def mutant_diff(sources: dict[str, str], mutant: str) -> tuple[list[str], str]:
    """(changed lines, kind): "message" if only prose string literals, labels or a stacklevel changed,
    "appearance" if only a plot's styling (sizes, fonts, colours, resolution) or a progress bar's display, "device"
    if only a device argument, else "behaviour"."""
    name = mutant.rsplit(".", 1)[-1]
    original = sources.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "").splitlines()
    changed = sources.get(name, "").splitlines()
    # the def line too (its name differs: the mutant's own), so mutated default arguments show
    original[:1] = [re.sub(r"__mutmut_\w+", "", line) for line in original[:1]]
    changed[:1] = [re.sub(r"__mutmut_\w+", "", line) for line in changed[:1]]
    diff = [line for line in difflib.unified_diff(original, changed, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]  # fmt: skip
    minus = "".join(without_text(line[1:]) for line in diff if line.startswith("-"))
    plus = "".join(without_text(line[1:]) for line in diff if line.startswith("+"))
    # text, not data: a changed literal is prose (has a space: error / warning / log wording), or the line raises /
    # warns, or only a stacklevel changed
    minus_lines = [line[1:] for line in diff if line.startswith("-")]
    plus_lines = [line[1:] for line in diff if line.startswith("+")]
    text_only = r"raise |Error\(|warn\(|stacklevel|\b(desc|label|title)\b|set_[xy]label\(|set_title\("
    prose = any(re.search(text_only, line) for line in diff) or any(
        re.search(r"\s", text) for text in changed_literals(minus_lines, plus_lines)
    )
    if minus == plus and prose:
        return [line.rstrip() for line in diff], "message"
    if diff and without_style(minus_lines) == without_style(plus_lines) is not None:
        return [line.rstrip() for line in diff], "appearance"
    # where tensors live: every tensor of the CPU-only tests is on the CPU already, so these cannot fail there
    device = r"device=[\w.\[\]]+|\"cpu\"|None|,|\s"
    minus_text = "".join(re.sub(device, "", line[1:]) for line in diff if line.startswith("-"))
    plus_text = "".join(re.sub(device, "", line[1:]) for line in diff if line.startswith("+"))
    on_cpu = minus_text == plus_text and any("device" in line or '"cpu"' in line for line in diff)
    return [line.rstrip() for line in diff], "device" if on_cpu else "behaviour"


def group_of(path: str) -> str:
    return next((group for prefix, group in GROUPS.items() if path.startswith(prefix)), str(Path(path).parent))


def summary(counts: Counter) -> dict:
    killed = counts["killed"] + counts["timeout"]
    checked = sum(n for status, n in counts.items() if status != "not checked")
    share = round(killed / checked, 4) if checked else None
    return {"killed": killed, "checked": checked, "total": sum(counts.values()), "killed_share": share,
            "by_status": dict(sorted(counts.items()))}  # fmt: skip


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    p, denominator = k / n, 1 + z * z / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / denominator, (centre + half) / denominator


def estimate(statuses: dict[str, str], drawn: list[str], unreached: int) -> dict:
    """The group's killed share when only a random sample (``drawn``) of its ``unreached`` mutants ran: the
    mutants outside the sample count as they are, the sample's share stands for every unreached one (stratified)."""
    dead, drawn = ("killed", "timeout"), set(drawn)
    sample = [statuses[name] for name in drawn if statuses.get(name, "not checked") != "not checked"]
    rest = [status for name, status in statuses.items() if name not in drawn and status != "not checked"]
    if not sample:
        return {}
    k, total = sum(status in dead for status in sample), len(rest) + unreached
    low, high = wilson(k, len(sample))
    known = sum(status in dead for status in rest)

    def share(rate: float) -> float:
        return round((known + rate * unreached) / total, 4)

    return {"sample_checked": len(sample), "sample_killed": k, "unreached": unreached,
            "estimated_killed_share": share(k / len(sample)), "interval_95": [share(low), share(high)]}  # fmt: skip


def main(root: Path = Path("mutants"), out: Path = Path("results/mutation/mutation.json")) -> dict:
    equivalent_file = Path(__file__).with_name("equivalent.json")  # survivors shown equivalent, by hand, with why
    equivalent = json.loads(equivalent_file.read_text()) if equivalent_file.is_file() else {}
    sample_file = Path(__file__).with_name("sample.json")  # a random sample of the mutants no run reached
    sample = json.loads(sample_file.read_text()) if sample_file.is_file() else {"drawn": {}, "unreached": {}}
    statuses = defaultdict(dict)  # group -> mutant -> status
    per_folder, per_file, not_killed = defaultdict(Counter), defaultdict(Counter), defaultdict(list)
    for meta in sorted(root.glob("upcycle/**/*.py.meta")):
        path = str(meta.relative_to(root)).removesuffix(".meta")
        if not (root.parent / path).is_file():
            continue  # stale: the source file moved or was deleted since mutmut wrote these results
        sources = function_sources(root / path)
        for mutant, code in sorted(json.loads(meta.read_text())["exit_code_by_key"].items()):
            status = STATUS.get(code, "suspicious")
            statuses[group_of(path)][mutant] = status
            per_folder[group_of(path)][status] += 1
            per_file[path][status] += 1
            if status in ("survived", "no tests", "suspicious", "segfault"):
                diff, kind = mutant_diff(sources, mutant)
                entry = {"mutant": mutant, "status": status, "kind": kind, "diff": diff}
                if mutant in equivalent:
                    entry.update(kind="equivalent", why=equivalent[mutant])
                not_killed[path].append(entry)
    kinds = defaultdict(Counter)
    for path, entries in not_killed.items():
        for entry in entries:
            kinds[group_of(path)][entry["kind"]] += 1
    report = {
        "tool": "mutmut", "command": "make mutation",
        "folders": {folder: {**summary(counts), "not_killed_by_kind": dict(sorted(kinds[folder].items())),
                             **estimate(statuses[folder], sample["drawn"].get(folder, []),
                                        sample["unreached"].get(folder, 0))}
                    for folder, counts in sorted(per_folder.items())},
        "files": {path: summary(counts) for path, counts in sorted(per_file.items())},
        "not_killed": dict(sorted(not_killed.items())),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for folder, s in report["folders"].items():
        share = "-" if s["killed_share"] is None else f"{100 * s['killed_share']:.1f}%"
        line = f"{folder:22s} killed {s['killed']:5d} / checked {s['checked']:5d} ({share}); total {s['total']}"
        if "estimated_killed_share" in s:
            low, high = s["interval_95"]
            line += (
                f"; estimated {100 * s['estimated_killed_share']:.1f}% (95% {100 * low:.1f}-{100 * high:.1f}%) "
                f"from {s['sample_killed']}/{s['sample_checked']} of a sample of its {s['unreached']} unreached"
            )
        print(line)
    return report


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
