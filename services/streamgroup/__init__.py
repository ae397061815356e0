"""streamgroup: Redis Streams consumer-group services that never lose a message."""

from streamgroup.errors import PoisonMessage
from streamgroup.message import Message

__all__ = ["Message", "PoisonMessage"]
__version__ = "0.1.0"
