"""The docs stay true to the code: line links, implementation-detail numbers, shown commands.

No training happens here: links are checked by parsing the source files (docs/sync_links.py),
commands by parsing their flags in-process with each file's ``parse_args``.
"""

import importlib
import importlib.util
import os
import re
import shlex
import sys

import pytest
import tyro
from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTATIONS = ["reppo_jax.py", "reppo_torch.py"]


def load_sync_links():
    spec = importlib.util.spec_from_file_location("sync_links", os.path.join(ROOT, "docs", "sync_links.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


sync_links = load_sync_links()


def existing_implementations() -> list[str]:
    missing = [name for name in IMPLEMENTATIONS if not os.path.isfile(os.path.join(ROOT, name))]
    assert not missing, f"missing implementation files: {missing}"
    return IMPLEMENTATIONS


def read(relative_path: str) -> str:
    with open(os.path.join(ROOT, relative_path), encoding="utf-8") as f:
        return f.read()


# --- 1. line links ---------------------------------------------------------------------


def test_every_code_link_points_at_what_it_names():
    report = sync_links.check(ROOT)
    assert report.total > 0, "no reppo_*.py#L links found: did the link format change?"
    problems = [f"{link.doc}:{link.line} {link.file} '{link.marker}': {why}" for link, why in report.broken]
    problems += [
        f"{link.doc}:{link.line} {link.file} '{link.marker}' is L{link.start}-L{link.end}, should be L{start}-L{end}"
        for link, (start, end) in report.stale
    ]
    assert not problems, "stale docs links (run `python docs/sync_links.py`):\n" + "\n".join(problems)


def test_the_first_linked_line_holds_the_named_symbol():
    """An independent look at the text: the range starts at the def/class/assignment/tag."""
    sources = {name: read(name).splitlines() for name in existing_implementations()}
    checked = 0
    for doc in sync_links.doc_files(ROOT):
        for link in sync_links.find_links(doc, ROOT):
            if link.file not in sources:
                continue
            first = sources[link.file][link.start - 1]
            tag = sync_links.TAG.fullmatch(link.marker)
            if tag:
                expected = re.compile(rf"#\s*IMPLEMENTATION DETAIL {tag.group(1)}:")
            else:
                name = re.escape(link.marker.split(".")[-1])
                expected = re.compile(rf"^\s*(?:(?:async\s+)?def|class)\s+{name}\b|^{name}\s*[:=]")
            assert expected.search(first), f"{doc}:{link.line}: {link.file} line {link.start} is {first!r}"
            checked += 1
    assert checked > 0


def test_docs_name_only_test_files_that_exist():
    for doc in sync_links.doc_files(ROOT):
        for path in sorted(set(re.findall(r"tests/test_\w+\.py", read(doc)))):
            assert os.path.isfile(os.path.join(ROOT, path)), f"{doc} names {path}, which does not exist"


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped (letters of
    any script, digits, '_' and '-' kept), spaces as hyphens; a repeated heading gets -1, -2..."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not in_code:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_every_anchor_link_names_a_heading():
    for doc in sync_links.doc_files(ROOT):
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", read(doc)):
            if target.startswith("http") or target.endswith(".py"):  # web pages; code links are checked above
                continue
            page = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
            assert anchor in heading_anchors(read(page)), f"{doc} links {target}#{anchor}: no such heading"


# --- 2. implementation details ----------------------------------------------------------


def documented_details() -> dict[int, str]:
    """Number -> text of each item of the numbered list under '## Implementation details'."""
    text = read(os.path.join("docs", "reppo.md"))
    section = re.search(r"^## Implementation details\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert section, "docs/reppo.md has no '## Implementation details' section"
    items = re.split(r"^(?=\d+\. )", section.group(1), flags=re.MULTILINE)
    details = {}
    for item in items:
        number = re.match(r"(\d+)\. ", item)
        if number:
            assert int(number.group(1)) not in details, f"detail {number.group(1)} is listed twice"
            details[int(number.group(1))] = item
    return details


def test_detail_list_is_numbered_one_to_n():
    numbers = list(documented_details())
    assert numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_every_tag_is_documented_and_every_documented_detail_is_tagged(name):
    tagged = set(sync_links.tags_in(os.path.join(ROOT, name)))
    documented = set(documented_details())
    assert tagged - documented == set(), f"tags in {name} missing from docs/reppo.md"
    assert documented - tagged == set(), f"details in docs/reppo.md not tagged in {name}"


def test_both_files_use_the_same_detail_numbers():
    numbers = {name: set(sync_links.tags_in(os.path.join(ROOT, name))) for name in existing_implementations()}
    assert numbers["reppo_jax.py"] == numbers["reppo_torch.py"]


def test_each_detail_item_links_its_own_tag_in_each_file():
    for number, item in documented_details().items():
        titled = re.findall(r"\]\(\.\./(reppo_\w+\.py)#L\d+-L\d+ \"IMPLEMENTATION DETAIL (\d+)(?: #\d+)?\"\)", item)
        assert titled, f"detail {number} links no tag"
        assert {int(n) for _, n in titled} == {number}, f"detail {number} links the tags {titled}"
        assert {f for f, _ in titled} == set(IMPLEMENTATIONS), f"detail {number} does not link both files"


# --- 3. commands ------------------------------------------------------------------------


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(where, file, argv) of every `python reppo_x.py ...` or `python benchmarks/x.py ...` line
    inside a fenced code block."""
    commands = []
    for doc in sync_links.doc_files(ROOT):
        in_block = False
        pending = ""
        for number, line in enumerate(read(doc).splitlines(), start=1):
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + line.strip()
            if line.endswith("\\"):  # a continued command
                pending = line[:-1] + " "
                continue
            pending = ""
            tokens = shlex.split(line.removeprefix("$ "), comments=True)
            while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value prefixes
                tokens = tokens[1:]
            script = r"(reppo_\w+|benchmarks/\w+)\.py"
            if len(tokens) >= 2 and tokens[0] in ("python", "python3") and re.fullmatch(script, tokens[1]):
                commands.append((f"{doc}:{number}", tokens[1], tokens[2:]))
    return commands


COMMANDS = shown_commands()


def test_docs_show_commands():
    assert any(file == "reppo_jax.py" for _, file, _ in COMMANDS)


@pytest.mark.parametrize("where,file,argv", COMMANDS, ids=[where for where, _, _ in COMMANDS])
def test_shown_command_parses(where, file, argv, capsys):
    assert os.path.isfile(os.path.join(ROOT, file)), f"{where} runs {file}, which does not exist"
    benchmarks = os.path.join(ROOT, "benchmarks")
    if file.startswith("benchmarks/") and benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)  # the scripts import each other
    name = os.path.basename(file).removesuffix(".py")
    require(name, "-r requirements-torch.txt")  # e.g. torch not installed: a skip, but a failure in CI
    module = importlib.import_module(name)
    try:
        # tyro parsing only: nothing is built or run
        if hasattr(module, "parse_args"):  # reppo_*.py
            module.parse_args(argv)
        else:  # benchmarks/*.py: their Options dataclass
            tyro.cli(module.Options, args=argv)
    except SystemExit as exit_:
        output = capsys.readouterr()
        assert exit_.code == 0, f"{where}: `python {file} {shlex.join(argv)}` does not parse:\n{output.err[-2000:]}"
