"""Dynamic micro-batching for ``mist-cloud serve``: concurrent requests share one backbone forward.

The forward thread takes the first waiting request, waits at most ``max_wait`` for more, up to ``max_batch``
images, and runs them as one forward. The queue is bounded: past ``max_queue`` images a request is refused
with ``QueueFull`` (the app answers 503), so memory stays bounded however many clients arrive.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


class QueueFull(Exception):
    pass


class Batcher:
    """Gather queued requests into forwards of at most ``max_batch`` images, one forward at a time.

    ``pending`` counts the images queued or in the forward; ``submit`` refuses a request that would take it
    past ``max_queue``, so memory stays bounded however many clients arrive. ``arriving`` counts the requests
    admitted but still being read or decoded: a forward waits for company only while some are, so a lone
    client never pays the wait.
    """

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], max_batch: int, max_wait_s: float,
                 max_queue: int):
        self.forward, self.max_batch, self.max_wait_s, self.max_queue = forward, max_batch, max_wait_s, max_queue
        self.pending = self.arriving = 0
        self.forwards = self.images = 0
        self._queue: deque[tuple[torch.Tensor, asyncio.Future]] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-forward")

    def has_room(self, n: int) -> bool:
        return self.pending + n <= self.max_queue

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        n = len(images)
        if not self.has_room(n):
            raise QueueFull
        self.pending += n
        future = asyncio.get_running_loop().create_future()
        self._queue.append((images, future))
        self._wake.set()
        try:
            return await future
        finally:
            self.pending -= n

    async def run(self) -> None:
        import torch

        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue.popleft()]
            count = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_batch:
                if self._queue:
                    if count + len(self._queue[0][0]) > self.max_batch:
                        break  # the next request waits for the next forward
                    batch.append(self._queue.popleft())
                    count += len(batch[-1][0])
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self.arriving == 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [(images, future) for images, future in batch if not future.done()]
            if not batch:
                continue
            try:
                features = await loop.run_in_executor(self._executor, self.forward,
                                                      torch.cat([images for images, _ in batch]))
            except Exception as e:  # one bad batch (e.g. a float16 overflow) fails its requests, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.forwards += 1
            self.images += count
            start = 0
            for images, future in batch:
                if not future.done():
                    future.set_result(features[start:start + len(images)])
                start += len(images)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
