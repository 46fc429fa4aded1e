"""NBD: how Hozon reads VM disks (and, later, serves backups) over the Network Block Device protocol.

``NbdClient`` (client.py) reads an export and its ``base:allocation`` / ``qemu:dirty-bitmap:NAME``
maps; handshake.py negotiates the connection, transport.py is the socket with its timeouts, and
protocol.py the wire format. Every failure is an ``NbdError`` (a ``HozonError``, exit code 1).
"""

from hozon.errors import NbdError
from hozon.nbd.client import Extent, NbdClient
from hozon.nbd.protocol import BlockSize

__all__ = ["BlockSize", "Extent", "NbdClient", "NbdError"]
