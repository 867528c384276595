"""The documentation stays true to the repository: relative links and their #anchors resolve, every test that
docs/claims.md names exists, every `argonne` command shown is one the CLI knows (with options it knows), and the
README stays a short user's guide. Reads files only; the CLI's parser is built in a child process from
src/argonne_cli.py, which must import neither torch nor transformers for it."""

import ast
import json
import re
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLAIMS = REPO / "docs" / "claims.md"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), RESULTS]
README_MAX_LINES = 250


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------------------------------------ reading Markdown

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


@cache
def split_markdown(path: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(prose lines, fenced code blocks as (language, text)): links and headings live in the prose only."""
    prose, blocks, fence, language, code = [], [], None, "", []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, code = match.group(1), match.group(2).lower(), []
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not match.group(2):
            blocks.append((language, "\n".join(code)))
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            prose.append(line)
    assert fence is None, f"{page_id(path)}: a code fence is never closed"
    return tuple(prose), tuple(blocks)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code marks removed), lowercased, every character but
    letters, digits, underscores, hyphens and spaces dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in split_markdown(path)[0]:
        if match := HEADING.match(line):
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")  # GitHub numbers repeated headings
    return frozenset(result)


def links(path: Path) -> list[str]:
    targets = []
    for line in split_markdown(path)[0]:
        if match := REFERENCE.match(line):
            targets.append(match.group(1))
            continue
        targets += LINK.findall(INLINE_CODE.sub("", line))  # `[x](y)` inside code is not a link
    return targets


def test_the_slug_rules_are_githubs():
    assert github_slug("2026-12-02 — what checkpoint checksums cost") == "2026-12-02--what-checkpoint-checksums-cost"
    assert github_slug("`argonne serve`") == "argonne-serve"
    assert github_slug("Checking a GGUF export in llama.cpp") == "checking-a-gguf-export-in-llamacpp"
    assert github_slug("Tensor parallel 8 on one node: arithmetic, not a measurement") == \
        "tensor-parallel-8-on-one-node-arithmetic-not-a-measurement"
    assert github_slug("The tiny preset's vocabulary (CPU)") == "the-tiny-presets-vocabulary-cpu"


# ------------------------------------------------------------------------------------------------ (1) links

def link_problem(page: Path, target: str) -> str | None:
    """Why a link from `page` does not resolve, or None when it does (or is not relative)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//", target):
        return None  # http:, https:, mailto:: outside the repository
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    file = page if not path_part else (page.parent / path_part).resolve()
    if not file.is_relative_to(REPO):
        return f"{target}: outside the repository"
    if not file.exists():
        return f"{target}: no such file or folder"
    if anchor:
        if file.suffix != ".md":
            return None if re.fullmatch(r"L\d+(-L\d+)?", anchor) else f"{target}: anchor into a file without headings"
        if unquote(anchor) not in anchors(file):
            return f"{target}: no heading in {page_id(file)} has the anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    found = links(page)
    problems = list(dict.fromkeys(problem for target in found if (problem := link_problem(page, target))))
    assert not problems, f"{page_id(page)}: broken links:\n  " + "\n  ".join(problems)


def test_the_pages_link_to_each_other():
    """Guards the link check itself: it must see links, or it would pass on anything."""
    assert any("docs/" in target for target in links(README))
    for page in (REPO / "docs").glob("*.md"):
        assert links(page), f"{page_id(page)}: no links found"


# ------------------------------------------------------------------------------------------------ (2) claims

TEST_REFERENCE = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?(\[[^\]\s`]*\])?")


@cache
def functions_of(file: Path) -> dict[str, bool]:
    """Test functions of a test file (`Class::method` for methods) -> whether they are parametrized."""
    tree = ast.parse(file.read_text(encoding="utf-8"))

    def parametrized(function) -> bool:
        return any("parametrize" in ast.unparse(decorator) for decorator in function.decorator_list)

    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = parametrized(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}::{item.name}"] = parametrized(item)
    return found


def reference_problem(file_name: str, first: str, second: str | None, params: str | None) -> str | None:
    name = f"{first}::{second}" if second else first
    shown = f"{file_name}::{name}{params or ''}"
    file = REPO / file_name
    if not file.is_file():
        return f"{shown}: no file {file_name}"
    functions = functions_of(file)
    if name not in functions:
        return f"{shown}: {file_name} has no `def {name.split('::')[-1]}`"
    if params and not functions[name]:
        return f"{shown}: {name} is not parametrized, so it has no {params} ids"
    return None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_tests_exist(page):
    text = page.read_text(encoding="utf-8")
    problems = list(dict.fromkeys(problem for match in TEST_REFERENCE.finditer(text)
                                  if (problem := reference_problem(*match.groups()))))
    assert not problems, f"{page_id(page)} names tests that do not exist:\n  " + "\n  ".join(problems)


def test_claims_name_their_tests():
    """docs/claims.md maps claims to tests: it must name many (so a broken pattern cannot pass for an empty page), and
    every row of its tables must name at least one."""
    text = CLAIMS.read_text(encoding="utf-8")
    assert len(set(TEST_REFERENCE.findall(text))) >= 50
    prose = split_markdown(CLAIMS)[0]
    rows = [line for line in prose if line.startswith("|") and not re.match(r"^\|\s*(claim|-+)\s*\|", line)]
    unproven = [row for row in rows if not TEST_REFERENCE.search(row)]
    assert not unproven, "claims without a test:\n  " + "\n  ".join(unproven)


# ------------------------------------------------------------------------------------------------ (3) commands

# Runs in a child process: the parser is built from argonne_cli alone, and building it must import neither torch nor
# transformers (that is what keeps `argonne --help` instant). Only command names and option strings are read back.
DESCRIBE_CLI = textwrap.dedent("""
    import argparse, json, sys

    sys.path.insert(0, sys.argv[1])
    import argonne_cli

    def describe(parser):
        commands = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands = {name: describe(sub) for name, sub in action.choices.items()}
        return {"options": sorted(o for a in parser._actions for o in a.option_strings),
                "overrides": bool(parser.get_default("accepts_overrides")), "commands": commands}

    parser = argonne_cli.build_parser()
    heavy = sorted(name for name in ("torch", "transformers", "argonne") if name in sys.modules)
    print(json.dumps({**describe(parser), "heavy_imports": heavy}))
""")


@cache
def cli() -> dict:
    result = subprocess.run([sys.executable, "-c", DESCRIBE_CLI, str(REPO / "src")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_cli_is_read_without_torch():
    tree = cli()
    assert tree["heavy_imports"] == []
    assert {"train", "generate", "serve", "data"} <= tree["commands"].keys()
    assert {"prepare", "inspect"} <= tree["commands"]["data"]["commands"].keys()
    assert "--kernels" in tree["commands"]["generate"]["options"]


SHELL = {"", "bash", "sh", "shell", "console", "text"}
SEGMENT_BREAK = re.compile(r"&&|\|\||;|\s\|\s")  # a shell pipe; not `a|b` in an option's values, nor a table's `\|`
OPTION = re.compile(r"(?<![\w-])(--[A-Za-z][\w.-]*)")


def shown_commands(page: Path) -> list[str]:
    """Every `argonne ...` (or `-m argonne ...`) command line in shell code blocks and inline code, from the
    subcommand on."""
    prose, blocks = split_markdown(page)
    texts = [code for language, code in blocks if language in SHELL]
    texts += [match.group(2) for line in prose for match in INLINE_CODE.finditer(line)]
    commands = []
    for text in texts:
        text = re.sub(r"\\\n\s*", " ", text)  # continued lines
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("#"):
                continue
            for segment in SEGMENT_BREAK.split(line):
                words = segment.split()
                if words[:1] == ["argonne"]:
                    commands.append(" ".join(words[1:]))
                elif "argonne" in words and words.index("argonne") > 0 \
                        and words[words.index("argonne") - 1] == "-m":
                    commands.append(" ".join(words[words.index("argonne") + 1:]))
    return [command for command in commands if command]


def command_problem(command: str) -> str | None:
    node, words, path = cli(), command.split(), ["argonne"]
    while node["commands"] and words and not words[0].startswith("-"):
        name = words.pop(0)
        if name not in node["commands"]:
            return f"argonne {command}: `{' '.join(path)}` has no subcommand {name!r} " \
                   f"(it has {', '.join(sorted(node['commands']))})"
        node = node["commands"][name]
        path.append(name)
    if node["commands"]:
        return f"argonne {command}: `{' '.join(path)}` needs a subcommand ({', '.join(sorted(node['commands']))})"
    for option in OPTION.findall(" ".join(words)):
        name = option.split("=", 1)[0]
        if "." in name and node["overrides"]:
            continue  # --section.field=value of the training commands
        if name not in node["options"]:
            return f"argonne {command}: `{' '.join(path)}` has no option {name}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_shown_are_real(page):
    problems = list(dict.fromkeys(problem for command in shown_commands(page) if (problem := command_problem(command))))
    assert not problems, f"{page_id(page)}:\n  " + "\n  ".join(problems)


def test_the_command_check_sees_the_commands():
    shown = shown_commands(README)
    assert any(command.startswith("train ") for command in shown)
    assert any(command.startswith("data prepare ") for command in shown)
    assert command_problem("trian configs/tiny.toml") is not None
    assert command_problem("data prepair x") is not None
    assert command_problem("generate MODEL --no-such-option") is not None
    assert command_problem("train configs/tiny.toml --train.steps=10 --resume auto") is None


# ------------------------------------------------------------------------------------------------ (4) the README

def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; depth belongs in docs/ (limit {README_MAX_LINES})"


def test_readme_shows_the_command_ci_runs():
    """CI runs the README's test command; the README must show that exact line."""
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci, ".ci/run runs no pytest"
    shown = {line.strip() for language, code in split_markdown(README)[1] if language in SHELL
             for line in code.splitlines()}
    assert ci[-1] in shown, f"README.md does not show the command CI runs: {ci[-1]}"
