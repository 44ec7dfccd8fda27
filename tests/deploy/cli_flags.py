"""What the deployment files may say to `understudy`: the flags each subcommand's --help lists."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys

SUBCOMMANDS = ("memory-server", "memory-status", "serve", "frontend", "up", "status", "snapshot")


@functools.cache
def help_flags(command: str) -> frozenset[str]:
    """The long flags in `understudy <command> --help`, as a user reads them."""
    out = subprocess.run([sys.executable, "-m", "understudy", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))


def invocations(words: list[str]) -> list[tuple[str, list[str]]]:
    """Each `understudy <subcommand> ...` in a command line (already split), with the flags that follow it up to
    the next `understudy` word, a shell separator or, for `up`, the `--` that starts the engine flags (those are
    returned as a `serve` invocation)."""
    found: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for i, word in enumerate(words):
        base = word.rsplit("/", 1)[-1]
        if base == "understudy" and i + 1 < len(words) and words[i + 1] in SUBCOMMANDS:
            current = []
            found.append((words[i + 1], current))
        elif current is not None and word in ("&&", "||", ";", "|", "&"):
            current = None
        elif current is not None and word == "--" and found[-1][0] == "up":
            current = []
            found.append(("serve", current))
        elif current is not None and word.startswith("--"):
            current.append(word.split("=", 1)[0])
    return found


def shell_words(text: str) -> list[str]:
    """A shell script or command line as words (comments and line breaks dropped; `$VAR` kept as is)."""
    words: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():  # continuation lines joined
        line = line.split(" #", 1)[0].rstrip()
        if line.strip().startswith("#"):
            continue
        try:
            words += shlex.split(line, posix=True)
        except ValueError:  # an unfinished quote: a multi-line string, judged word by word
            words += line.split()
        words.append(";")
    return words


def unknown_flags(words: list[str]) -> list[str]:
    """`subcommand --flag` for every flag used that its --help does not list."""
    return [f"{cmd} {flag}" for cmd, flags in invocations(words) for flag in flags if flag not in help_flags(cmd)]
