"""docs/exit-codes.md and the error classes must agree: scripts rely on these numbers."""

from __future__ import annotations

import re
from pathlib import Path

from hozon import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md"


def test_every_error_class_is_documented_with_its_exit_code() -> None:
    documented: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| (\d+) \|.*\|(.*)\|$", line)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(2)):
                documented[name] = int(m.group(1))
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.HozonError)]
    assert classes
    for cls in classes:
        assert cls.__name__ in documented, f"{cls.__name__} is missing from docs/exit-codes.md"
        assert documented[cls.__name__] == cls.exit_code, cls.__name__
