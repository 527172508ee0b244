"""Dynamic batching: requests that arrive close together are answered by one batch.

Requests wait in a bounded queue (full: 429). One worker takes the first waiting request, then whatever
else arrives within the batching window, up to `max_batch` rows (texts or prompts), and runs them on a
single model thread: classification rows of all adapters in one forward per model, generation rows in one
decoding loop per model (mixed LoRA adapters share it). While a batch runs, new requests queue up and form
the next one. Admin loads and unloads run on the same thread, so they never change a model mid-batch.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deltatune.serve.engine import Engine
from deltatune.serve.errors import ServeError
from deltatune.serve.metrics import Metrics

STOP = object()  # the queue's last item: the worker finishes what is before it, then ends
DONE = object()  # a stream's last item


@dataclass
class Job:
    kind: str  # "classify" | "complete"
    size: int  # rows it adds to a batch
    work: Any = None  # engine.ClassifyWork, or (Served, decode.Row)
    future: asyncio.Future | None = None
    stream: asyncio.Queue | None = None  # pieces of text as they are generated, then DONE
    cancelled: bool = False  # timed out, or the client went away: not started, or stopped early
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, max_batch: int = 32, max_queue: int = 256,
                 window_s: float = 0.005):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="deltatune-model")
        self.carry: Any = None  # an item taken from the queue that did not fit the batch being formed
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        """Answer everything already queued, then end the worker (graceful shutdown)."""
        await self.queue.put(STOP)
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    def submit(self, job: Job) -> Job:
        job.future = self.loop.create_future()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServeError(f"the server is busy: {self.queue.maxsize} requests are already waiting "
                             f"(--max-queue); retry later", 429, "queue_full") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return job

    async def result(self, job: Job, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ServeError(f"the request took longer than {timeout_s:g} s (--timeout) and was stopped", 504,
                             "timeout") from None

    async def exclusive(self, fn, *args) -> Any:
        """Run fn on the model thread, between batches (loading and unloading adapters)."""
        return await self.loop.run_in_executor(self.executor, fn, *args)

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                try:
                    await self.loop.run_in_executor(self.executor, self._run, batch)
                except Exception as e:  # never let one batch end the worker: later requests would hang
                    for job in batch:
                        _settle(job, e)
            if self.carry is STOP:
                return

    async def _collect(self) -> list[Job]:
        first = self.carry if self.carry is not None else await self.queue.get()
        self.carry = None
        if first is STOP:
            self.carry = STOP
            return []
        batch, rows = [first], first.size
        deadline = self.loop.time() + self.window_s
        while rows < self.max_batch:
            remaining = deadline - self.loop.time()
            try:  # after the window, still take what is already waiting
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if job is STOP or rows + job.size > self.max_batch:
                self.carry = job
                break
            batch.append(job)
            rows += job.size
        self.metrics.queue_depth.set(self.queue.qsize())
        return batch

    def _run(self, batch: list[Job]) -> None:
        """On the model thread: each kind of request answered in one engine call; results go back to the loop."""
        live = [j for j in batch if not j.cancelled]
        for kind, answer in (("classify", self.engine.classify_many), ("complete", self.engine.complete_many)):
            jobs = [j for j in live if j.kind == kind]
            if not jobs:
                continue
            self.metrics.batch_rows.labels(kind).observe(sum(j.size for j in jobs))
            try:
                results = answer([j.work for j in jobs])
            except Exception as e:  # a bug, not a request's fault: every request of the batch says so
                results = [e] * len(jobs)
            for job, result in zip(jobs, results):
                self.loop.call_soon_threadsafe(_settle, job, result)


def _settle(job: Job, result: Any) -> None:
    if not job.future.done():
        if isinstance(result, Exception):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
    if job.stream is not None:
        job.stream.put_nowait(DONE)
