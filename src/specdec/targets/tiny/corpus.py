"""The tiny target's training corpus: the CPython standard library shaped into chat data.

Every Python install carries the standard library, so the corpus needs no download. Functions with
docstrings become "write this function" conversations, class and module docstrings become "explain"
conversations, and comment prose becomes plain text. Files are split into train / held-out by a hash of
their path, so held-out perplexity is measured on modules the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import io
import random
import re
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MAX_FUNCTION_CHARS = 2400
MIN_DOCSTRING_CHARS = 24
MIN_PROSE_CHARS = 160

WRITE_PROMPTS = (
    "Write a Python function `{signature}` that does the following:\n\n{doc}",
    "Implement `{signature}` in Python.\n\n{doc}",
    "Please write `{signature}`. Its docstring should say:\n\n{doc}",
    "I need a function `{signature}`.\n{doc}",
)
METHOD_PROMPTS = (
    "Write the method `{owner}.{signature}` for the `{owner}` class:\n\n{doc}",
    "Implement the `{owner}.{signature}` method.\n\n{doc}",
)
EXPLAIN_PROMPTS = (
    "What does `{name}` do?",
    "Explain `{name}` in the Python standard library.",
    "Describe the purpose of `{name}`.",
)


@dataclass(frozen=True)
class Document:
    """One training document: a single-turn conversation, or plain text when ``prompt`` is None."""

    source: str  # path of the stdlib file, relative to the stdlib root
    text: str
    prompt: str | None = None

    @property
    def is_conversation(self) -> bool:
        return self.prompt is not None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative_path: str, held_out_every: int = 20) -> bool:
    """Deterministic file-level split: about 1 in ``held_out_every`` files is held out."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % held_out_every == 0


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as handle:
            return handle.read()
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or relative.stem


def _clean_doc(doc: str) -> str:
    return textwrap.dedent(doc).strip()


def _function_documents(tree: ast.Module, lines: list[str], rel: str, rng: random.Random) -> Iterator[Document]:
    """Yield write-this-function conversations for every documented function and method."""

    def visit(node: ast.AST, owner: str | None) -> Iterator[Document]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, child.name)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                if not doc or len(_clean_doc(doc)) < MIN_DOCSTRING_CHARS:
                    continue
                first = min([d.lineno for d in child.decorator_list] + [child.lineno]) - 1
                code = textwrap.dedent("\n".join(lines[first : child.end_lineno])).rstrip()
                if len(code) > MAX_FUNCTION_CHARS:
                    continue
                signature = f"{child.name}({ast.unparse(child.args)})"
                if owner:
                    prompt = rng.choice(METHOD_PROMPTS).format(owner=owner, signature=signature, doc=_clean_doc(doc))
                else:
                    prompt = rng.choice(WRITE_PROMPTS).format(signature=signature, doc=_clean_doc(doc))
                yield Document(source=rel, text=f"```python\n{code}\n```", prompt=prompt)

    yield from visit(tree, None)


def _explain_documents(tree: ast.Module, rel: str, module: str, rng: random.Random) -> Iterator[Document]:
    """Yield "what does X do" conversations answered by module and class docstrings."""
    targets: list[tuple[str, str | None]] = [(module, ast.get_docstring(tree))]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            targets.append((f"{module}.{node.name}", ast.get_docstring(node)))
    for name, doc in targets:
        if doc and len(_clean_doc(doc)) >= MIN_PROSE_CHARS // 2:
            yield Document(source=rel, text=_clean_doc(doc), prompt=rng.choice(EXPLAIN_PROMPTS).format(name=name))


_COMMENT = re.compile(r"^\s*#\s?(.*)$")


def _comment_documents(source: str, rel: str) -> Iterator[Document]:
    """Yield runs of consecutive comment lines long enough to be prose."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return
    block: list[str] = []
    last_line = -2
    for token in tokens:
        if token.type != tokenize.COMMENT:
            continue
        text = _COMMENT.match(token.line)
        if text is None:  # a trailing comment after code is not prose
            continue
        line = token.start[0]
        if line != last_line + 1 and block:
            yield from _flush(block, rel)
            block = []
        block.append(text.group(1).rstrip())
        last_line = line
    yield from _flush(block, rel)


def _flush(block: list[str], rel: str) -> Iterator[Document]:
    text = "\n".join(block).strip()
    if len(text) >= MIN_PROSE_CHARS and sum(ch.isalpha() for ch in text) > 0.6 * len(text):
        yield Document(source=rel, text=text)


def file_documents(path: Path, root: Path, seed: int = 0) -> list[Document]:
    """All documents made from one stdlib file (empty when it does not parse)."""
    source = _read_source(path)
    if source is None:
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    rel = path.relative_to(root).as_posix()
    module = _module_name(path.relative_to(root))
    rng = random.Random(f"{seed}:{rel}")
    documents = list(_function_documents(tree, source.splitlines(), rel, rng))
    documents += _explain_documents(tree, rel, module, rng)
    documents += _comment_documents(source, rel)
    return documents


def build_corpus(seed: int = 0, root: Path | None = None) -> tuple[list[Document], list[Document]]:
    """Return (train, held_out) documents from the stdlib, split by file."""
    root = root or stdlib_root()
    train: list[Document] = []
    held_out: list[Document] = []
    for path in stdlib_files(root):
        documents = file_documents(path, root, seed)
        (held_out if is_held_out(path.relative_to(root).as_posix()) else train).extend(documents)
    return train, held_out
