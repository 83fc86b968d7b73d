"""Server-sent events for streaming chat completions, in the chunk format OpenAI's clients parse.

The answer's pieces come from the model thread (`on_text`) through an asyncio queue. The response starts
only once the first piece (or the end, or an error) is there, so a request the model refuses (prompt too
long, bad state) still gets its HTTP error status instead of a 200 with an error inside the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from .batcher import Generation

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TextStream:
    """Pieces of one answer as the model thread decodes them; iterate after `submit` has given the future."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue[str] = asyncio.Queue()
        self.future: Future[Generation] | None = None

    def on_text(self) -> Callable[[str], None]:
        """The callback for the model thread: hands each piece to the event loop."""
        return lambda piece: self._loop.call_soon_threadsafe(self._pieces.put_nowait, piece)

    async def first(self, timeout_s: float) -> str | None:
        """Wait for the first piece, or for the end; the answer's error, if any, is raised here."""
        assert self.future is not None, "submit the request first"
        done = asyncio.wrap_future(self.future)
        piece = asyncio.ensure_future(self._pieces.get())
        finished, _ = await asyncio.wait({piece, done}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if piece in finished:
            return piece.result()
        piece.cancel()
        if not finished:
            raise TimeoutError
        done.result()  # raises the model's error, if any
        return None

    async def rest(self) -> AsyncIterator[str]:
        """The remaining pieces, until the answer is complete."""
        assert self.future is not None
        done = asyncio.wrap_future(self.future)
        while not done.done() or not self._pieces.empty():
            piece = asyncio.ensure_future(self._pieces.get())
            finished, _ = await asyncio.wait({piece, done}, return_when=asyncio.FIRST_COMPLETED)
            if piece in finished:
                yield piece.result()
            else:
                piece.cancel()
