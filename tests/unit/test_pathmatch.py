"""The one pattern matcher of backup and restore: restic's rules (docs/patterns.md)."""

from __future__ import annotations

import pytest

from hozon.errors import UsageError
from hozon.pathmatch import PatternList


def walk(patterns: list[str], path: str) -> list[tuple[str, bool, bool]]:
    """(component, matches, may match below) for each component of ``path``, walking down as a restore does."""
    matcher = PatternList(patterns)
    state = matcher.root()
    out = []
    for name in path.strip("/").split("/"):
        state = matcher.child(state, name)
        out.append((name, *matcher.verdict(state)))
    return out


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    # anchored at the root
    ("/etc/ssh", "/etc/ssh", True),
    ("/etc/ssh", "/etc/ssh/sshd_config", True),  # a matching directory takes its contents
    ("/etc/ssh", "/etc/sshd", False),
    ("/etc/ssh", "/srv/etc/ssh", False),
    ("/etc/ssh/", "/etc/ssh/x", True),  # a trailing slash changes nothing
    ("/dir/sub/", "/dir/sub", True),
    ("//etc//ssh", "/etc/ssh", True),
    ("/", "/anything/at/all", True),
    # any other pattern matches at any depth
    ("etc/ssh", "/etc/ssh/ssh_config", True),
    ("etc/ssh", "/chroot/etc/ssh", True),
    ("ssh_config", "/etc/ssh/ssh_config", True),
    ("ssh_config", "/etc/ssh/ssh_config.d", False),
    ("*.conf", "/a.conf", True),
    ("*.conf", "/etc/deep/down/x.conf", True),
    ("*.conf", "/etc/x.conf.bak", False),
    ("*.conf", "/etc/.hidden.conf", True),  # a leading dot is an ordinary character
    ("sub/*.tmp", "/x/d1/sub/a.tmp", True),
    ("sub/*.tmp", "/x/d1/sub/deeper/a.tmp", False),
    ("sub/*.tmp", "/x/d1/other/a.tmp", False),
    ("./cache", "/home/u/cache", True),
    # globs never cross a slash; ** does
    ("/etc/*", "/etc/a/b", True),  # /etc/a matches, b is below it
    ("/*/b", "/a/x/b", False),
    ("/a/**/x", "/a/x", True),
    ("/a/**/x", "/a/b/c/x", True),
    ("/a/**/x", "/b/c/x", False),
    ("/a/**", "/a/b", True),
    ("**/x", "/p/q/x", True),
    ("/a/**/b/**/c", "/a/1/b/2/3/c", True),
    ("/a/**/b/**/c", "/a/1/2/3/c", False),
    ("[ab]c", "/q/bc", True),
    ("[!ab]c", "/q/bc", False),
    ("?.txt", "/q/x.txt", True),
    ("?.txt", "/q/xy.txt", False),
    (r"a\*b", "/a*b", True),
    (r"a\*b", "/axb", False),
    ("Case", "/case", False),
])
def test_match(pattern: str, path: str, expected: bool) -> None:
    assert PatternList([pattern]).matches(path) is expected


def test_negation_takes_back_what_earlier_patterns_matched() -> None:
    matcher = PatternList(["/dir/*", "!/dir/keep"])
    assert matcher.matches("/dir/a")
    assert not matcher.matches("/dir/keep")
    assert not matcher.matches("/dir/keep/below")
    assert not matcher.matches("/dir")
    # a later pattern matches again
    assert PatternList(["*.log", "!/var/log", "/var/log/x.log"]).matches("/var/log/x.log")
    assert not PatternList(["*.log", "!/var/log"]).matches("/var/log/y.log")
    # a negation alone matches nothing
    assert not PatternList(["!x"]).matches("/x")


def test_descent_of_an_anchored_pattern_follows_its_prefix() -> None:
    assert walk(["/etc/ssh/*.conf"], "/etc/ssh/a.conf") == [
        ("etc", False, True), ("ssh", False, True), ("a.conf", True, True)]
    assert walk(["/etc/ssh/*.conf"], "/var/log") == [("var", False, False), ("log", False, False)]
    assert walk(["/etc/ssh/*.conf"], "/etc/pam.d") == [("etc", False, True), ("pam.d", False, False)]
    # ** keeps every directory below its prefix open, and only those
    assert walk(["/srv/**/*.conf"], "/srv/a/b/c")[-1] == ("c", False, True)
    assert walk(["/srv/**/*.conf"], "/opt/a")[-1] == ("a", False, False)


def test_a_pattern_that_matches_at_any_depth_descends_everywhere() -> None:
    assert walk(["*.conf"], "/usr/share/doc/x") == [
        ("usr", False, True), ("share", False, True), ("doc", False, True), ("x", False, True)]
    assert walk(["ssh/*.conf"], "/a/b/ssh/c.conf")[-1] == ("c.conf", True, True)


def test_a_negation_that_matches_a_directory_stops_descent() -> None:
    assert walk(["*.conf", "!/etc/private"], "/etc/private/a.conf") == [
        ("etc", False, True), ("private", False, False), ("a.conf", False, False)]


def test_patterns_that_matched_nothing_are_named() -> None:
    matcher = PatternList(["/etc/ssh", "*.nothing", "!/etc/ssh/x", "/etc/**/y"])
    for path in ("/etc/ssh/a", "/etc/q/y"):
        state = matcher.root()
        for name in path.strip("/").split("/"):
            state = matcher.child(state, name)
    assert matcher.unused() == ["*.nothing"]


@pytest.mark.parametrize("pattern", ["", "!", ".", "./", "a/../b", "!.."])
def test_patterns_that_name_no_path_are_usage_errors(pattern: str) -> None:
    with pytest.raises(UsageError) as caught:
        PatternList(["ok", pattern])
    assert caught.value.exit_code == 2
    assert repr(pattern) in caught.value.message


def _named(patterns: list[str], path: str) -> bool:
    """Whether find's rule names ``path`` itself (a match does not take a directory's contents)."""
    matcher = PatternList(patterns)
    positions = tuple(s for s in matcher.root() if s is not None)
    for name in path.strip("/").split("/"):
        positions = matcher.entry_child(positions, name)
    return matcher.entry_verdict(positions)[0]


def test_find_names_an_entry_only_when_the_pattern_ends_on_it() -> None:
    assert _named(["*.conf"], "/etc/x.conf")
    assert _named(["*.conf"], "/etc/x.conf/inner.conf")
    assert not _named(["*.conf"], "/etc/x.conf/other.txt")  # inside a match, but not named by it
    assert _named(["/etc/ssh"], "/etc/ssh") and not _named(["/etc/ssh"], "/etc/ssh/sshd_config")
    assert _named(["/var/**/*.log"], "/var/log/a/b.log") and _named(["/var/**/*.log"], "/var/c.log")
    assert not _named(["*.conf", "!a.conf"], "/etc/a.conf")
