"""Code copied between scripts (DESIGN §8) must not drift: every `# Copied from module.Name [with A->B, C->D]`
comment on the line above a top-level def/class is checked against the source it names."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"#\s*Copied from (\w+)\.(\w+)(?:\s+with\s+(.+))?$")


def _top_level(path: Path) -> tuple[str, dict[str, ast.AST]]:
    src = path.read_text()
    return src, {n.name: n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _copies():
    for path in sorted(ROOT.glob("*.py")):
        src, defs = _top_level(path)
        lines = src.splitlines()
        for name, node in defs.items():
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            m = MARK.search(lines[first - 2]) if first >= 2 else None
            if m:
                yield path, name, node, src, m


def test_copies_match_their_source():
    found = 0
    for path, name, node, src, m in _copies():
        found += 1
        module, orig_name, repl = m.groups()
        orig_path = ROOT / f"{module}.py"
        assert orig_path.is_file(), f"{path.name}:{name} says it is copied from {module}.py, which does not exist"
        orig_src, orig_defs = _top_level(orig_path)
        assert orig_name in orig_defs, f"{path.name}:{name} says it is copied from {module}.{orig_name}: not found"
        expected = ast.get_source_segment(orig_src, orig_defs[orig_name])
        for pair in (repl.split(",") if repl else []):
            a, b = (s.strip() for s in pair.split("->"))
            expected = expected.replace(a, b)
        actual = ast.get_source_segment(src, node)
        assert actual == expected, f"{path.name}:{name} drifted from {module}.{orig_name}; copy it again"
    print(f"{found} copies checked")


def test_mark_pattern_reads_replacements(tmp_path):
    m = MARK.search("# Copied from hilt.Decoder with Decoder->Dec, 512->256")
    assert m.groups() == ("hilt", "Decoder", "Decoder->Dec, 512->256")
