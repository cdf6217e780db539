"""The server side of one runner connection, as tokio-tungstenite behaves under the real server.

websockets handles pings and the message size limit inside its protocol layer, where the channel code
cannot see them; the real server sees every frame (any frame, pings included, resets the idle read
timeout) and ends an oversized message with a capacity error and no Close frame. This subclass notes
the time of every incoming frame and enforces the limit itself, and `drop` ends the connection the way
the real server does on every error: what was sent is flushed, then the TCP connection closes, with no
Close frame (websockets would otherwise send one when the handler returns).
"""

from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode


class ChannelConnection(ServerConnection):
    """Notes every incoming frame's time in `last_frame` and drops a message over `max_message`."""

    max_message: int | None = None

    @classmethod
    def limited_to(cls, max_message: int | None) -> type["ChannelConnection"]:
        """A connection class for one server, with its message size limit (None: no limit)."""
        return type(cls.__name__, (cls,), {"max_message": max_message})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_frame = self.loop.time()
        self.dropped = False
        self._message_size = 0

    def process_event(self, event: Any) -> None:
        if self.dropped:
            return
        if isinstance(event, Frame):
            self.last_frame = self.loop.time()
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                before = self._message_size if event.opcode is Opcode.CONT else 0
                self._message_size = before + len(event.data)
                if self.max_message is not None and self._message_size > self.max_message:
                    self.drop()
                    return
                if event.fin:
                    self._message_size = 0
        super().process_event(event)

    def drop(self) -> None:
        """Flush what was sent, then close the TCP connection with no Close frame."""
        self.dropped = True
        self.transport.close()

    def send_data(self) -> None:
        if self.dropped:  # the Close frame websockets would send after the handler returns
            list(self.protocol.data_to_send())
            return
        super().send_data()
