"""Batching: the model's process merges concurrent requests into one model call.

Calls that arrive while the model is busy are merged into its next call, up to max_images (a larger call is split
into several); a call that finds the model idle runs at once: no request is held back on purpose (Triton's dynamic
batcher with no queue delay behaves the same). Small calls (up to small_images) queue apart and go first, so a burst
of bulk uploads does not make interactive requests wait behind it. A call that would wait longer than max_latency_s
for the model, at the rate the model has lately kept, is refused at once (Overloaded). Model calls run one at a
time, on one thread; a call expected to take less than `inline_s` at that rate runs on the event loop instead (a
hand-off to the model thread costs ~0.25 ms of CPU: about what a one-image call of a small model on the CPU takes).
"""
import asyncio
import collections
import concurrent.futures
import time

import numpy as np

from serving.admission import Overloaded
from training.contract import chunks


class Batcher:
    def __init__(self, run, max_images, max_latency_s, small_images=16, inline_s=0.0, on_call=None):
        self.run, self.max_images, self.max_latency, self.small = run, max_images, max_latency_s, small_images
        self.inline_s = inline_s
        self.on_call = on_call               # told how many requests each model call merged
        self.queues = {True: collections.deque(), False: collections.deque()}   # small?: (images, future)
        self.waiting = {True: 0, False: 0}   # images queued, by kind
        self.running = 0                     # images in the model call under way
        self.img_per_s = None                # of the model, over its recent calls (learn)
        self.worker = None
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")

    async def __call__(self, images):
        """The logits of IMAGES, from a model call that may hold other callers' images too."""
        small = len(images) <= self.small
        ahead = self.running + self.waiting[True] + (0 if small else self.waiting[False])
        wait = ahead / self.img_per_s if self.img_per_s else 0.0
        if wait > self.max_latency:
            raise Overloaded(f"server busy: this request would wait about {wait:.1f} s for the model, longer than "
                             f"CIFAR100_MAX_LATENCY_MS={round(1000 * self.max_latency)} allows; retry later",
                             wait - self.max_latency)
        loop = asyncio.get_running_loop()
        futures = []
        for rows in chunks(len(images), self.max_images):   # a larger request: split, in order
            futures.append(loop.create_future())
            self.queues[small].append((images[rows], futures[-1]))
            self.waiting[small] += rows.stop - rows.start
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self.drain())
        results = await asyncio.gather(*futures)
        return results[0] if len(results) == 1 else np.concatenate(results)

    def next_call(self):
        """The jobs of the next model call: small ones first, then bulk ones, up to max_images."""
        jobs, n = [], 0
        for small in (True, False):
            queue = self.queues[small]
            while queue and n + len(queue[0][0]) <= self.max_images:
                jobs.append(queue.popleft())
                n += len(jobs[-1][0])
                self.waiting[small] -= len(jobs[-1][0])
        return jobs, n

    def learn(self, images, seconds):
        """Fold a model call of IMAGES images that took SECONDS into the model's rate; only calls of more than
        small_images count: in smaller ones the cost of a call hides the cost of an image (a 1-image call would
        make a 1024-image one look ten times longer than it is)."""
        if images > self.small:
            rate = images / max(seconds, 1e-6)
            self.img_per_s = rate if self.img_per_s is None else 0.8 * self.img_per_s + 0.2 * rate

    async def drain(self):
        loop = asyncio.get_running_loop()
        while any(self.queues.values()):
            jobs, self.running = self.next_call()
            if self.on_call:
                self.on_call(len(jobs))
            batch = jobs[0][0] if len(jobs) == 1 else np.concatenate([images for images, _ in jobs])
            start = time.perf_counter()
            quick = self.img_per_s and self.running / self.img_per_s < self.inline_s
            try:
                logits = self.run(batch) if quick else await loop.run_in_executor(self.thread, self.run, batch)
            except Exception as e:   # every caller of this call gets the error
                results = [e] * len(jobs)
            else:
                self.learn(self.running, time.perf_counter() - start)
                results = [logits] if len(jobs) == 1 else \
                    np.split(logits, np.cumsum([len(images) for images, _ in jobs])[:-1])
            finally:
                self.running = 0
            for (_, future), result in zip(jobs, results):
                if future.done():   # its caller went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
