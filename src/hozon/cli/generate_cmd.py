"""hozon generate: shell completion scripts, man pages and the Markdown reference (restic's generate)."""

from __future__ import annotations

import os
import sys

import typer

from hozon.cli import manual
from hozon.cli.common import err_console
from hozon.errors import UsageError


def generate(
    ctx: typer.Context,
    bash_completion: str = typer.Option("", "--bash-completion", metavar="FILE",
                                        help="Write the bash completion script to FILE ('-': standard output)."),
    zsh_completion: str = typer.Option("", "--zsh-completion", metavar="FILE",
                                       help="Write the zsh completion script to FILE ('-': standard output)."),
    fish_completion: str = typer.Option("", "--fish-completion", metavar="FILE",
                                        help="Write the fish completion script to FILE ('-': standard output)."),
    man: str = typer.Option("", "--man", metavar="DIR", help="Write one man page per command into DIR."),
    markdown: str = typer.Option("", "--markdown", metavar="FILE",
                                 help="Write the command reference (docs/cli.md) to FILE ('-': standard output)."),
) -> None:
    """Write shell completion scripts, man pages or the Markdown command reference."""
    root = ctx.find_root().command
    if not any((bash_completion, zsh_completion, fish_completion, man, markdown)):
        raise UsageError("nothing to generate", hint="give --bash-completion FILE, --man DIR, --markdown FILE, …")
    for target, shell in ((bash_completion, "bash"), (zsh_completion, "zsh"), (fish_completion, "fish")):
        if target:
            _write(target, manual.completion_script(shell) + "\n")
    if markdown:
        _write(markdown, manual.reference_markdown(root))
    if man:
        os.makedirs(man, exist_ok=True)
        pages = manual.man_pages(root)
        for name, page in pages.items():
            _write(os.path.join(man, name), page)
        err_console.print(f"wrote {len(pages)} man pages to {man}", markup=False)


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror}") from exc
