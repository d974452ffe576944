"""Keep the line links of the docs pointing at the code they name.

Every link of the form ``[text](../reppo_jax.py#L10-L20)`` or
``[text](../reppo_torch.py#L10-L20 "marker")`` in ``docs/*.md`` and ``README.md`` names what
it points at:

- the link's title (the quoted part) if it has one, otherwise the link text without
  backticks, e.g. ``soft_lambda_returns``, ``Critic``, ``Critic.q_logits``, ``ACTION_CLIP``;
- or an implementation-detail tag, e.g. ``IMPLEMENTATION DETAIL 5``; a file may carry the same
  tag more than once (one environment wrapper per suite), ``IMPLEMENTATION DETAIL 5 #2`` names
  the second occurrence.

A name is looked up in the file with the ``ast`` module: a ``def`` or ``class`` (nested ones
too; a dotted name such as ``Runner.evaluate`` picks one of several with the same last part)
spans from its ``def``/``class`` line to the last line of its body; a module-level
assignment spans its statement. A tag spans its comment block and the statement that
follows it.

    python docs/sync_links.py           # rewrite every stale range in place
    python docs/sync_links.py --check   # list stale or broken links, exit 1 if any

A link into ``reppo_torch.py`` while that file does not exist yet is reported and skipped
(not an error), so the check starts to apply the day the file lands.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# [text](path/reppo_x.py#L1-L2 "optional title")
LINK = re.compile(
    r"\[(?P<text>[^\]]+)\]\((?P<path>(?:\.\./|\./)*(?P<file>reppo_[A-Za-z0-9_]+\.py))"
    r"#L(?P<start>\d+)(?:-L(?P<end>\d+))?(?:\s+\"(?P<title>[^\"]*)\")?\)"
)
TAG = re.compile(r"IMPLEMENTATION DETAIL (\d+)(?:\s*#(\d+))?")
TAG_LINE = re.compile(r"#\s*IMPLEMENTATION DETAIL (\d+):")
OPTIONAL_FILES = {"reppo_torch.py"}  # may not exist yet: links into it are skipped


@dataclass
class Link:
    doc: str  # the markdown file, relative to the repository root
    line: int  # 1-based line of the link in that file
    file: str  # reppo_jax.py / reppo_torch.py
    marker: str  # the symbol or tag it names
    start: int
    end: int
    span: tuple[int, int]  # character span of the whole match within its line


def doc_files(root: str = ROOT) -> list[str]:
    """docs/*.md and the top-level README.md, relative to ``root``."""
    docs_dir = os.path.join(root, "docs")
    found = sorted(os.path.join("docs", n) for n in os.listdir(docs_dir) if n.endswith(".md"))
    if os.path.isfile(os.path.join(root, "README.md")):
        found.insert(0, "README.md")
    return found


def marker_of(match: re.Match) -> str:
    """The name a link points at: its title if any, else its text without backticks/()."""
    marker = match.group("title") or match.group("text")
    marker = marker.strip().strip("`").strip()
    return marker.removesuffix("()")


def find_links(doc: str, root: str = ROOT) -> list[Link]:
    links = []
    with open(os.path.join(root, doc), encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            for match in LINK.finditer(text):
                start = int(match.group("start"))
                end = int(match.group("end") or start)
                links.append(Link(doc, number, match.group("file"), marker_of(match), start, end, match.span()))
    return links


class SourceIndex:
    """Where every def/class, module-level assignment and tag of one source file lives."""

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            self.source = f.read()
        self.lines = self.source.splitlines()
        tree = ast.parse(self.source)
        self.defs: dict[str, tuple[int, int]] = {}  # qualified name -> (first, last)
        self.statements: list[tuple[int, int]] = []  # every statement's (first, last)
        self._walk(tree, "")
        for node in tree.body:  # module-level NAME = ... / NAME: type = ...
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.defs.setdefault(target.id, (node.lineno, node.end_lineno))

    def _walk(self, node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.stmt):
                self.statements.append((child.lineno, child.end_lineno))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                self.defs[name] = (child.lineno, child.end_lineno)
                name += "."
            self._walk(child, name)

    def resolve_symbol(self, symbol: str) -> tuple[int, int]:
        if symbol in self.defs:
            return self.defs[symbol]
        matches = [q for q in self.defs if q.endswith("." + symbol)]
        if len(matches) == 1:
            return self.defs[matches[0]]
        if not matches:
            raise LookupError(f"no def, class or module-level name '{symbol}'")
        raise LookupError(f"'{symbol}' is ambiguous ({', '.join(sorted(matches))}); use a dotted name")

    def resolve_tag(self, number: int, occurrence: int = 1) -> tuple[int, int]:
        hits = [i for i, text in enumerate(self.lines) if (m := TAG_LINE.search(text)) and int(m.group(1)) == number]
        if not hits:
            raise LookupError(f"no '# IMPLEMENTATION DETAIL {number}:' comment")
        if occurrence > len(hits):
            raise LookupError(f"'IMPLEMENTATION DETAIL {number}' is tagged {len(hits)} times, not {occurrence}")
        first = last = hits[occurrence - 1]  # 0-based
        while last + 1 < len(self.lines) and self.lines[last + 1].strip().startswith("#"):
            last += 1
        following = last + 2  # 1-based line of the statement after the comment block
        ends = [end for start, end in self.statements if start == following]
        if ends:
            last = max(ends) - 1
        return first + 1, last + 1

    def resolve(self, marker: str) -> tuple[int, int]:
        tag = TAG.fullmatch(marker)
        if tag:
            return self.resolve_tag(int(tag.group(1)), int(tag.group(2) or 1))
        return self.resolve_symbol(marker)


def tags_in(path: str) -> list[int]:
    """Numbers of every '# IMPLEMENTATION DETAIL n:' comment in a source file, in file order."""
    with open(path, encoding="utf-8") as f:
        return [int(m.group(1)) for line in f if (m := TAG_LINE.search(line))]


@dataclass
class Report:
    stale: list[tuple[Link, tuple[int, int]]]  # link, the range it should have
    broken: list[tuple[Link, str]]  # link, why it cannot be resolved
    skipped: list[Link]  # links into an optional file that does not exist yet
    total: int


def check(root: str = ROOT) -> Report:
    indexes: dict[str, SourceIndex | None] = {}
    report = Report([], [], [], 0)
    for doc in doc_files(root):
        for link in find_links(doc, root):
            report.total += 1
            if link.file not in indexes:
                path = os.path.join(root, link.file)
                indexes[link.file] = SourceIndex(path) if os.path.isfile(path) else None
            index = indexes[link.file]
            if index is None:
                if link.file in OPTIONAL_FILES:
                    report.skipped.append(link)
                else:
                    report.broken.append((link, f"{link.file} does not exist"))
                continue
            try:
                expected = index.resolve(link.marker)
            except LookupError as error:
                report.broken.append((link, str(error)))
                continue
            if expected != (link.start, link.end):
                report.stale.append((link, expected))
    return report


def rewrite(report: Report, root: str = ROOT) -> None:
    """Set every stale link's range to the one its marker resolves to."""
    by_doc: dict[str, list[tuple[Link, tuple[int, int]]]] = {}
    for link, expected in report.stale:
        by_doc.setdefault(link.doc, []).append((link, expected))
    for doc, fixes in by_doc.items():
        path = os.path.join(root, doc)
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Right to left within a line, so earlier spans stay valid.
        for link, (start, end) in sorted(fixes, key=lambda fix: (fix[0].line, -fix[0].span[0])):
            text = lines[link.line - 1]
            old = text[link.span[0] : link.span[1]]
            new = re.sub(r"#L\d+(?:-L\d+)?", f"#L{start}-L{end}", old, count=1)
            lines[link.line - 1] = text[: link.span[0]] + new + text[link.span[1] :]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale or broken links; exit 1 if any")
    args = parser.parse_args(argv)
    report = check()
    for link in report.skipped:
        print(f"skipped {link.doc}:{link.line}: {link.file} does not exist yet ('{link.marker}')")
    for link, why in report.broken:
        print(f"BROKEN  {link.doc}:{link.line}: {link.file} '{link.marker}': {why}")
    for link, (start, end) in report.stale:
        verb = "STALE  " if args.check else "fixed  "
        print(
            f"{verb} {link.doc}:{link.line}: {link.file} '{link.marker}' L{link.start}-L{link.end} -> L{start}-L{end}"
        )
    if not args.check and report.stale:
        rewrite(report)
    print(
        f"{report.total} links: {len(report.stale)} stale{' (rewritten)' if not args.check else ''}, "
        f"{len(report.broken)} broken, {len(report.skipped)} skipped"
    )
    if report.broken or (args.check and report.stale):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
