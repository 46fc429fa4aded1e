"""The agent directory: ``agent.json`` (0600; credential, namespace, repository password) and ``ca.pem``.

This module is a leaf (standard library, ``hozon.errors`` and ``hozon.private_file`` only): the ``hozon+https`` storage
backend reads an agent's credentials through it, below the rest of the agent package.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from hozon.errors import UsageError
from hozon.private_file import write_private

CONFIG_FILE = "agent.json"
CA_FILE = "ca.pem"
ENV_DIR = "HOZON_AGENT_DIR"


@dataclass(frozen=True)
class AgentConfig:
    url: str  # https://HOST:PORT of the server
    agent_id: int
    name: str
    secret: str  # the agent's bearer credential
    namespace: str
    password: str  # the namespace's repository password
    directory: Path

    @property
    def ca_file(self) -> Path:
        """The server's CA certificate, pinned at enrolment."""
        return self.directory / CA_FILE

    @classmethod
    def load(cls, directory: Path) -> AgentConfig:
        path = directory / CONFIG_FILE
        try:
            doc = json.loads(path.read_text())
            return cls(doc["url"], int(doc["agent_id"]), doc["name"], doc["secret"], doc["namespace"],
                       doc["password"], directory)
        except FileNotFoundError:
            raise UsageError(f"{directory} is not an enrolled agent directory (no {CONFIG_FILE})",
                             hint="enrol first: hozon agent enroll URL --token TOKEN --dir DIR") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc

    @classmethod
    def from_env(cls) -> AgentConfig:
        """The agent named by HOZON_AGENT_DIR."""
        directory = os.environ.get(ENV_DIR)
        if not directory:
            raise UsageError(f"a hozon+https repository needs an enrolled agent: set {ENV_DIR}",
                             hint="enrol with: hozon agent enroll URL --token TOKEN --dir DIR")
        return cls.load(Path(directory))

    def save(self, ca_pem: bytes) -> None:
        """Write ``ca.pem`` then ``agent.json`` (0600, atomically: its presence means enrolled)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        write_private(self.directory / CA_FILE, ca_pem)
        doc = {k: v for k, v in asdict(self).items() if k != "directory"}
        write_private(self.directory / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
