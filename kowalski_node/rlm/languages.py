"""Language names for code blocks: alias folding and inference for untagged code.

Inference is a handful of cheap, explainable heuristics (plus `compile()` for
Python, which is pure and does not run anything); it only has to be good enough
to route a block or to tell the model clearly that its block cannot run here.
"""

from __future__ import annotations

import re
import warnings

UNKNOWN = "unknown"

_ALIASES: dict[str, str] = {
    "repl": "python",
    "python": "python",
    "python3": "python",
    "py": "python",
    "py3": "python",
    "ipython": "python",
    "pycon": "python",
    "sh": "shell",
    "bash": "shell",
    "shell": "shell",
    "zsh": "shell",
    "console": "shell",
    "shell-session": "shell",
    "js": "javascript",
    "javascript": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "ts": "typescript",
    "typescript": "typescript",
    "rb": "ruby",
    "ruby": "ruby",
    "r": "r",
    "sql": "sql",
    "rust": "rust",
    "rs": "rust",
    "go": "go",
    "golang": "go",
    "c": "c",
    "cpp": "cpp",
    "c++": "cpp",
    "java": "java",
    "kotlin": "kotlin",
    "swift": "swift",
    "php": "php",
    "perl": "perl",
    "lua": "lua",
    "julia": "julia",
    "powershell": "powershell",
    "ps1": "powershell",
}

# Fence tags that mark data or prose, not a program: never executed, never complained about.
NON_CODE_TAGS = frozenset(
    {
        "text", "txt", "plain", "plaintext", "output", "out", "result", "stdout", "log",
        "markdown", "md", "json", "jsonl", "yaml", "yml", "toml", "csv", "tsv", "xml",
        "html", "diff", "ini", "none", "math", "latex", "tex",
    }
)  # fmt: skip


def normalize_language(tag: str) -> str:
    """Fold a fence tag or executor language name to one canonical name."""
    cleaned = tag.strip().lower()
    cleaned = cleaned.split()[0] if cleaned else cleaned
    cleaned = cleaned.strip("{}.")
    return _ALIASES.get(cleaned, cleaned or UNKNOWN)


def is_known_tag(tag: str) -> bool:
    """True for a fence tag naming a language (or a data format) this module knows."""
    cleaned = tag.strip().lower()
    return cleaned in _ALIASES or cleaned in NON_CODE_TAGS


def is_non_code_tag(tag: str) -> bool:
    cleaned = tag.strip().lower().split()
    return bool(cleaned) and cleaned[0] in NON_CODE_TAGS


def compiles_as_python(code: str) -> bool:
    """True when `code` is syntactically valid Python (nothing is executed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(code, "<block>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False
    return True


_SHEBANG = re.compile(r"^#!\s*\S*?(?:/env\s+)?(\w+)")
_JS_STRONG = re.compile(
    r"\bconsole\.log\s*\(|\brequire\s*\(\s*['\"]|\bdocument\.|\bmodule\.exports\b|"
    r"^\s*(?:const|let|var)\s+\w+\s*=|\bfunction\s+\w+\s*\(|=>\s*[{(\w]|===|!==",
    re.MULTILINE,
)
_SHELL_COMMANDS = (
    "ls", "cd", "echo", "cat", "grep", "pip", "pip3", "curl", "wget", "export", "mkdir",
    "rm", "cp", "mv", "sudo", "apt", "apt-get", "git", "wc", "head", "tail", "find",
    "chmod", "touch", "sed", "awk", "sort", "uniq", "xargs", "tar", "npm", "brew", "pwd",
)  # fmt: skip
_SHELL_LINE = re.compile(
    r"^\s*(?:\$\s+|(?:" + "|".join(re.escape(c) for c in _SHELL_COMMANDS) + r")(?:\s|$))",
    re.MULTILINE,
)
_SQL = re.compile(r"^\s*(?:SELECT\s.+\sFROM\s|INSERT\s+INTO\s|CREATE\s+TABLE\s|UPDATE\s+\w+\s+SET\s)",
                  re.IGNORECASE | re.MULTILINE | re.DOTALL)  # fmt: skip
_RUST = re.compile(r"\bfn\s+\w+\s*\(|\blet\s+mut\s|println!\s*\(")
_GO = re.compile(r"^\s*package\s+\w+\s*$|\bfunc\s+\w+\s*\(|fmt\.Print", re.MULTILINE)
_R = re.compile(r"^\s*\w+\s*<-\s*\S", re.MULTILINE)
_RUBY = re.compile(r"^\s*(?:puts|require)\s+['\"\w]", re.MULTILINE)
_C_LIKE = re.compile(r"^\s*#include\s*<|\bint\s+main\s*\(", re.MULTILINE)
_PY_SIGNAL = re.compile(
    r"^\s*(?:def\s+\w+\s*\(|class\s+\w+|import\s+\w|from\s+[\w.]+\s+import\s|for\s+.+\s+in\s+.+:|"
    r"if\s+.+:|while\s+.+:|with\s+.+:|print\s*\(|return\b)|\b(?:context|llm_query|llm_query_batched|"
    r"FINAL_VAR|SHOW_VARS)\b",
    re.MULTILINE,
)


def infer_language(code: str) -> str:
    """Best guess of an untagged block's language; UNKNOWN when nothing points anywhere.

    Order matters: strong markers of other languages win even over code that
    happens to compile as Python (`console.log("x")` is valid Python syntax).
    """
    text = code.strip()
    if not text:
        return UNKNOWN
    shebang = _SHEBANG.match(text)
    if shebang:
        interp = shebang.group(1).lower()
        if interp.startswith("python"):
            return "python"
        if interp in {"sh", "bash", "zsh", "dash"}:
            return "shell"
        if interp in {"node", "nodejs"}:
            return "javascript"
    if _C_LIKE.search(text):
        return "c"
    if _RUST.search(text):
        return "rust"
    if _GO.search(text):
        return "go"
    if _R.search(text):
        return "r"  # `x <- 1` also compiles as Python (`x < -1`)
    python_ok = compiles_as_python(text)
    if _JS_STRONG.search(text) and (not python_ok or not _PY_SIGNAL.search(text)):
        return "javascript"
    if python_ok:
        return "python"
    if _SQL.search(text):
        return "sql"
    if _SHELL_LINE.search(text):
        return "shell"
    if _RUBY.search(text):
        return "ruby"
    if _PY_SIGNAL.search(text):
        # Looks like Python but does not compile: run it anyway so the model sees its SyntaxError.
        return "python"
    return UNKNOWN
