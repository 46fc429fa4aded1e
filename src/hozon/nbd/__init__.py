"""NBD: how Hozon reads and restores VM disks (and, later, serves backups) over the Network Block
Device protocol.

``NbdClient`` (client.py) reads an export and its ``base:allocation`` / ``qemu:dirty-bitmap:NAME``
maps, and writes it (write, write_many, write_zeroes, trim, flush) unless it is read-only;
requests.py holds the requests in flight; handshake.py negotiates the connection, transport.py
is the socket with its timeouts, and protocol.py the wire format. Every failure is an
``NbdError`` (a ``HozonError``, exit code 1); a request the server failed is an
``NbdRequestError`` carrying the server's error number.
"""

from hozon.errors import NbdError
from hozon.nbd.client import Extent, NbdClient, NbdRequestError
from hozon.nbd.protocol import BlockSize

__all__ = ["BlockSize", "Extent", "NbdClient", "NbdError", "NbdRequestError"]
