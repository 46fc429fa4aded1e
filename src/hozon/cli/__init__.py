"""The ``hozon`` command: parse, call an operation, render. Nothing else lives here."""
